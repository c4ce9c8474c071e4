"""The Grain loader with worker processes (spawned, so slow to start: kept to one test)."""

import numpy as np

from ldm_jax.data import loader
from ldm_jax.data import shapes
from ldm_jax.data import transforms


def _loader(src, **kw):
  return loader.make_loader(src, batch_size=4, seed=7, process_index=0, process_count=1,
                            read_threads=1, read_buffer_size=8, **kw)


def _same(a, b):
  return (a.keys() == b.keys() and
          all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a))


def test_two_workers_match_in_content_and_resume():
  src = shapes.ShapesSource(seed=3, size=16, length=48)
  tf = transforms.ImageTransform(16, flip=True)
  it = _loader(src, worker_count=2, transform=tf)
  first = [next(it) for _ in range(4)]
  idx = np.concatenate([b["index"] for b in first])
  assert len(set(idx.tolist())) == 16  # no record twice within the epoch so far
  for b in first:  # workers produce exactly what the source + transform give
    i = int(b["index"][0])
    single = tf(src[i], np.random.default_rng(0))
    assert b["caption"][0] == single["caption"]
    img = b["image"][0]
    assert (np.array_equal(img, single["image"]) or np.array_equal(img, single["image"][:, ::-1]))
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = _loader(src, worker_count=2, transform=tf)
  resumed.set_state(state)
  assert all(_same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(3)]))
