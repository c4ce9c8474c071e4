"""A Grain loader over the sources of `sources.py`: per-host shards, seeded epoch shuffles, resumable
state.

    source = make_dataset(DataConfig(name="shapes", size=64))
    it = make_loader(source, batch_size=32, seed=0, transform=ImageTransform(64, flip=True))
    batch = next(it)          # {"image": float32 [32, 64, 64, 3] in [-1, 1], "label": [32], ...}
    state = it.get_state()    # JSON-serialisable dict; save it beside the model checkpoint
    it2 = make_loader(source, batch_size=32, seed=0, transform=...); it2.set_state(state)
    # next(it2) is exactly the batch that next(it) would have returned.

Order: Grain's IndexSampler draws a fresh permutation of the whole source every epoch from the
seed; host `process_index` of `process_count` takes every process_count-th element of that global
order (so hosts are disjoint within an epoch and the union covers it), transforms it with a
per-record generator derived from the seed, and batches `batch_size` (per host) with the remainder
dropped. Worker processes (`worker_count`) parallelise reading and transforming; Grain hands
worker w every worker_count-th record of the host's order and each worker batches its own records,
so the batches are a deterministic function of (seed, process_index, process_count,
worker_count), and a saved state may only be restored into a loader with the same settings
(checked in `set_state`).
"""

import dataclasses
import json
from typing import Any, Callable, Mapping

from absl import flags
import grain
import numpy as np

from ldm_jax.data import sources
from ldm_jax.data import transforms as transforms_lib
from ldm_jax.data.sources import DataConfig

STATE_VERSION = 1


# ---------------------------------------------------------------- sources by name -----------------
def make_dataset(config: DataConfig | Mapping[str, Any] | None = None, **kwargs):
  """Builds a random-access source from a DataConfig, a mapping (e.g. a ConfigDict) or kwargs;
  the name picks the source in `sources.SOURCES`."""
  if config is None:
    config = {}
  if not isinstance(config, DataConfig):
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    values = {**dict(config), **kwargs}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown data config fields {unknown}; expected some of {sorted(fields)}")
    config = DataConfig(**values)
  elif kwargs:
    config = dataclasses.replace(config, **kwargs)
  return sources.get(config.name).build(config)


# ---------------------------------------------------------------- loader --------------------------
def default_transform(record: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
  """uint8 images -> float32 [-1, 1]; everything else unchanged (sizes must already agree)."""
  del rng
  out = dict(record)
  if "image" in out and np.asarray(out["image"]).dtype == np.uint8:
    out["image"] = transforms_lib.to_float(np.asarray(out["image"]))
  return out


class _RecordTransform(grain.transforms.RandomMap):
  """Adapts a `fn(record, rng) -> record` to Grain; rng is the per-record generator."""

  def __init__(self, fn: Callable[[dict, np.random.Generator], dict]):
    self.fn = fn

  def random_map(self, element, rng: np.random.Generator):
    return self.fn(element, rng)


class DataIterator:
  """Iterator over batches (dicts of numpy arrays) with JSON-serialisable get_state/set_state."""

  def __init__(self, loader: grain.DataLoader, meta: dict[str, Any]):
    self._loader = loader
    self._meta = meta
    self._it = iter(loader)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def close(self) -> None:
    """Stops the worker processes and frees their shared memory; call it when done."""
    inner = getattr(self._it, "_iterator", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def meta(self) -> dict[str, Any]:
    """The loader settings that a saved state must agree with."""
    return dict(self._meta)

  def get_state(self) -> dict[str, Any]:
    """The position of the iterator as a JSON-serialisable dict."""
    return {"version": STATE_VERSION, "meta": dict(self._meta),
            "grain": json.loads(self._it.get_state().decode())}

  def set_state(self, state: dict[str, Any] | str | bytes) -> None:
    """Restores a state from `get_state` (as the dict, or its JSON text)."""
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state with version "
                       f"{state.get('version') if isinstance(state, dict) else None!r}; "
                       f"expected a dict from DataIterator.get_state (version {STATE_VERSION})")
    mismatched = {k: (state["meta"].get(k), v) for k, v in self._meta.items()
                  if state["meta"].get(k) != v}
    if mismatched:
      raise ValueError("data iterator state does not fit this loader; (saved, current) per "
                       f"setting: {mismatched}")
    self._it.set_state(json.dumps(state["grain"]).encode())


def make_loader(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                transform: Callable | None = None, drop_remainder: bool = True,
                worker_buffer_size: int = 2, read_threads: int = 8,
                read_buffer_size: int = 256) -> DataIterator:
  """A Grain DataLoader over `source`, returning a resumable iterator of per-host batches.

  Args:
    source: random-access source (`__len__`, `__getitem__`, a `repr` that is stable across runs).
    batch_size: examples per batch on this host.
    seed: drives the epoch shuffles and the per-record transform generators.
    shuffle: reshuffle the whole source every epoch.
    num_epochs: None repeats forever.
    worker_count: transform worker processes (0 = in this process).
    process_index, process_count: this host's shard; default jax.process_index()/process_count().
    transform: fn(record, rng) -> record, e.g. `transforms.ImageTransform`; must be picklable when
      worker_count > 0. Default: uint8 images to float32 [-1, 1].
    drop_remainder: drop the last incomplete batch of the run (the shard itself always drops the
      records that do not divide evenly between hosts).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads, read_buffer_size: threads reading and transforming records (in each worker, or
      here when worker_count=0) and how many records they may run ahead. Grain's defaults (16,
      500) overload small hosts and make a freshly created or restored iterator slow to start.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}; expected a positive per-host batch size")
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed={seed}; Grain expects a non-negative 32-bit seed")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} with process_count={process_count}; "
                     "expected 0 <= process_index < process_count")
  if len(source) < process_count:
    raise ValueError(f"source of {len(source)} records cannot be split over {process_count} hosts")

  if worker_count and not flags.FLAGS.is_parsed():
    # Grain's multiprocessing reads absl flags; outside an absl app nobody has parsed them, and
    # reading an unparsed flag raises. Their defaults are what we want.
    flags.FLAGS.mark_as_parsed()

  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        num_epochs=num_epochs, seed=seed)
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                      drop_remainder=True)
  operations = [_RecordTransform(transform or default_transform),
                grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size)
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                            shard_options=shard, read_options=read_options)
  meta = {"source": repr(source), "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
          "num_epochs": num_epochs, "worker_count": worker_count,
          "process_index": process_index, "process_count": process_count}
  return DataIterator(loader, meta)
