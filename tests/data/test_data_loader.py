"""The Grain loader: batches, epochs, host shards, resumable state, worker processes."""

import json

import ml_collections
import numpy as np
import pytest

from ldm_jax.data import loader
from ldm_jax.data import shapes
from ldm_jax.data import transforms


def _src(length=32, size=16):
  return shapes.ShapesSource(seed=3, size=size, length=length)


def _loader(src, **kw):
  args = dict(batch_size=4, seed=7, process_index=0, process_count=1, read_threads=2,
              read_buffer_size=8)
  args.update(kw)
  return loader.make_loader(src, **args)


def test_batches_are_dicts_of_arrays():
  src = _src()
  b = next(_loader(src, transform=transforms.ImageTransform(16, flip=True)))
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["label"].shape == (4,) and b["boxes"].shape == (4, 1, 4)
  assert [str(c) for c in b["caption"]] == [src[i]["caption"] for i in b["index"]]
  assert np.array_equal(b["label"], [src[i]["label"] for i in b["index"]])


def test_epochs_are_reshuffled_permutations_and_runs_are_deterministic():
  src = _src()
  order = np.concatenate([b["index"] for b in _loader(src, num_epochs=2)])
  assert len(order) == 64
  first, second = order[:32], order[32:]
  assert sorted(first) == list(range(32)) and sorted(second) == list(range(32))
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(32))
  again = np.concatenate([b["index"] for b in _loader(src, num_epochs=2)])
  assert np.array_equal(order, again)
  other = np.concatenate([b["index"] for b in _loader(src, num_epochs=2, seed=8)])
  assert not np.array_equal(order, other)
  plain = np.concatenate([b["index"] for b in _loader(src, num_epochs=1, shuffle=False)])
  assert np.array_equal(plain, np.arange(32))


def test_drop_remainder():
  src = _src(length=30)
  assert len(list(_loader(src, num_epochs=1))) == 7  # 30 // 4
  sizes = [len(b["index"]) for b in _loader(src, num_epochs=1, drop_remainder=False)]
  assert sizes == [4] * 7 + [2]


def test_two_hosts_see_disjoint_shards_covering_the_data():
  src = _src(length=40)
  seen = []
  for host in range(2):
    it = _loader(src, num_epochs=1, process_index=host, process_count=2)
    idx = np.concatenate([b["index"] for b in it])
    assert len(idx) == 20
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))
  with pytest.raises(ValueError, match="process_index=2 with process_count=2"):
    _loader(src, process_index=2, process_count=2)


def _same(a, b):
  return (a.keys() == b.keys() and
          all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a))


@pytest.mark.parametrize("k", [3, 9])  # 9 crosses the epoch boundary (8 batches per epoch)
def test_saved_state_resumes_with_the_next_batches(k):
  src = _src()
  make = lambda: _loader(src, transform=transforms.ImageTransform(16, random_crop=True, flip=True))
  it = make()
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  expected = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(state)
  assert all(_same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(5)]))
  # Also from the JSON text, and a fresh iterator differs (so the comparison can fail).
  text_resumed = make()
  text_resumed.set_state(json.dumps(state))
  assert _same(next(text_resumed), expected[0])
  assert not _same(next(make()), expected[0])


def test_state_of_another_loader_is_rejected():
  src = _src()
  state = _loader(src).get_state()
  with pytest.raises(ValueError, match="batch_size"):
    _loader(src, batch_size=8).set_state(state)
  with pytest.raises(ValueError, match="expected a dict from DataIterator.get_state"):
    _loader(src).set_state({"grain": {}})


def test_make_dataset_from_configs():
  src = loader.make_dataset(loader.DataConfig(name="shapes", size=16, length=5))
  assert isinstance(src, shapes.ShapesSource) and len(src) == 5 and src.size == 16
  cfg = ml_collections.ConfigDict({"name": "shapes", "num_objects": 2, "length": 3})
  src = loader.make_dataset(cfg)
  assert src.num_objects == 2 and src[0]["boxes"].shape == (2, 4)
  assert loader.make_dataset(name="shapes", seed=9).seed == 9
  with pytest.raises(ValueError, match=r"unknown data config fields \['sise'\]"):
    loader.make_dataset(name="shapes", sise=3)
  with pytest.raises(ValueError, match="data name='imagenet'"):
    loader.make_dataset(name="imagenet")


def test_host_shard_defaults_to_jax_process():
  import jax  # pylint: disable=g-import-not-at-top
  it = loader.make_loader(_src(), batch_size=2, seed=0, read_threads=1, read_buffer_size=4)
  assert it.meta["process_index"] == jax.process_index() == 0
  assert it.meta["process_count"] == jax.process_count() == 1
  assert next(it)["image"].shape == (2, 16, 16, 3)
