"""train.py as one process that sees the global batches of an N-host run, for test_multihost.

  python multihost_worker.py HOSTS train.py-flags...

The data loader gives host i of N every N-th example of the shuffled order, so the global batch of
an N-process run is [host 0's rows, host 1's rows, ...], not the single-process order. This runs
the real train.py in ONE process whose pipeline concatenates the N hosts' batches in that order,
so its losses must equal the multi-process run's step for step: what differs is only the
distributed machinery (collectives, global arrays, multi-host checkpoints).
"""

import runpy
import sys

import numpy as np

from ldm_jax.data import loader as loader_lib
from ldm_jax.train import inputs


class EmulatedHosts:
  """inputs.Pipeline's interface over `hosts` per-host loaders (shapes data, no transforms)."""

  def __init__(self, config, hosts: int):
    if config.data.source != "shapes" or config.data.random_crop or config.data.random_flip:
      raise ValueError("EmulatedHosts supports only shapes data without crop/flip.")
    source = loader_lib.make_dataset(inputs.data_config(config))
    self._its = [loader_lib.make_loader(source, batch_size=config.data.batch_size // hosts,
                                        seed=config.seed, shuffle=True,
                                        worker_count=config.data.worker_count,
                                        process_index=i, process_count=hosts)
                 for i in range(hosts)]

    self._peeked = None

  def peek(self):
    if self._peeked is None:
      self._peeked = self.next()
    return self._peeked

  def next(self):
    if self._peeked is not None:
      batch, self._peeked = self._peeked, None
      return batch
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"hosts": [it.get_state() for it in self._its]}

  def set_state(self, state):
    for it, s in zip(self._its, state["hosts"]):
      it.set_state(s)


def main():
  hosts = int(sys.argv[1])
  inputs.make_pipeline = lambda config, mesh=None: EmulatedHosts(config, hosts)
  sys.argv = ["train.py"] + sys.argv[2:]
  runpy.run_path("train.py", run_name="__main__")


if __name__ == "__main__":
  main()
