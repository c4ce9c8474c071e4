"""The training input pipeline: config.data -> a per-host, resumable iterator of batches.

The global batch (config.data.batch_size) is split evenly over hosts; each host loads its own shard
(Grain, `jax.process_index()`), and the trainer assembles the per-host arrays into global ones.
"""

from typing import Any

import jax

from ldm_jax.data import loader as loader_lib
from ldm_jax.data import sources
from ldm_jax.data import transforms


def data_config(config) -> sources.DataConfig:
  """The DataConfig of an experiment config's `data` block (the source named by data.source), reading
  the boxes or maps its model's condition needs."""
  return sources.data_config(config.data, config.seed, config.model)


class Pipeline:
  """next() / peek() over per-host batches, with the loader's saveable state."""

  def __init__(self, config, mesh=None):
    count = jax.process_count()
    if config.data.batch_size % count:
      raise ValueError(f"config.data.batch_size={config.data.batch_size}: must divide evenly over "
                       f"the {count} hosts.")
    devices = mesh.devices.size if mesh is not None else 1
    if config.data.batch_size % devices:
      raise ValueError(f"config.data.batch_size={config.data.batch_size}: must be divisible by the "
                       f"{devices} devices of the mesh.")
    self.source = loader_lib.make_dataset(data_config(config))
    transform = None
    kind = sources.get(config.data.source, "config.data.source")
    if kind.yields == sources.IMAGES and (config.data.random_crop or config.data.random_flip
                                          or not kind.drawn_at_size):
      transform = transforms.ImageTransform(size=config.data.image_size,
                                            random_crop=config.data.random_crop,
                                            flip=config.data.random_flip)
    self._it = loader_lib.make_loader(self.source, batch_size=config.data.batch_size // count,
                                      seed=config.seed, shuffle=True,
                                      worker_count=config.data.worker_count,
                                      transform=transform)
    self._peeked = None

  def peek(self) -> dict[str, Any]:
    """The next batch without consuming it (the trainer estimates scale_by_std from it)."""
    if self._peeked is None:
      self._peeked = next(self._it)
    return self._peeked

  def next(self) -> dict[str, Any]:
    if self._peeked is not None:
      batch, self._peeked = self._peeked, None
      return batch
    return next(self._it)

  def get_state(self):
    if self._peeked is not None:
      raise RuntimeError("Pipeline.get_state with a peeked batch: consume it first.")
    return self._it.get_state()

  def set_state(self, state) -> None:
    if isinstance(state, dict) and "processes" in state:
      # Saved by a multi-host run (loop.gather_host_states): one state per process.
      states, count = state["processes"], jax.process_count()
      if len(states) != count:
        raise ValueError(f"data iterator state: the checkpoint holds {len(states)} hosts' states, "
                         f"this run has {count} hosts; resume with {len(states)} hosts.")
      state = states[jax.process_index()]
    self._peeked = None
    self._it.set_state(state)


def make_pipeline(config, mesh=None) -> Pipeline:
  return Pipeline(config, mesh)
