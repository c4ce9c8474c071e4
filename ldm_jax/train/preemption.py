"""Preemption: turn SIGTERM into "save a checkpoint and exit 0".

Cloud schedulers (TPU VMs, Kubernetes, SLURM) send SIGTERM some seconds
before killing a job. `PreemptionGuard` records it, the train loop polls
`guard.should_stop(step)` once per step, saves and returns normally:

  with PreemptionGuard() as guard:
    for step in range(start, total):
      state, metrics = train_step(state, next(batches))
      if guard.should_stop(step):
        ckpt.save(step + 1, state, extra, force=True)
        ckpt.wait()
        break

Single process: a Python SIGTERM handler sets a flag. Several processes: all
of them must save at the same step (the save is collective), so the guard
asks JAX's preemption sync service
(`multihost_utils.reached_preemption_sync_point`), which the coordination
service arms when `jax.distributed.initialize` runs; a Python handler would
replace that service's own signal handler, so none is installed then.

Long phases between steps (sample grids, evaluation) call `guard.check()` between their batches;
it raises `Interrupted` once a signal arrived, so the loop saves within about one batch of the
signal rather than after the whole phase. In multi-process runs a local signal cannot be agreed on
mid-phase (the sync point is per step), so there `check` never raises and the step boundary decides.
"""

import signal
import threading
from typing import Iterable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """Raised by `PreemptionGuard.check` inside a long phase once preemption was requested."""


class PreemptionGuard:
  """Context manager that turns preemption signals into a polled flag.

  Args:
    signals: signals to catch in single-process runs (default SIGTERM).
    multihost: use the JAX preemption sync point; default: when
      `jax.process_count() > 1`.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,),
               multihost: Optional[bool] = None):
    self.signals = tuple(signals)
    self.multihost = multihost
    self._flag = threading.Event()
    self._previous = {}
    self._sync_broken = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    # Only set a flag: the loop saves at a step boundary, never mid-step.
    self._flag.set()

  def __enter__(self) -> 'PreemptionGuard':
    if self.multihost is None:
      self.multihost = jax.process_count() > 1
    if not self.multihost:
      if threading.current_thread() is not threading.main_thread():
        raise RuntimeError('PreemptionGuard must be entered on the main '
                           'thread (Python delivers signals only there)')
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    """True once this process caught a preemption signal."""
    return self._flag.is_set()

  def request(self) -> None:
    """Asks the loop to stop as if preempted (e.g. from a time budget)."""
    self._flag.set()

  def check(self) -> None:
    """Raises Interrupted if this (single) process was asked to stop; cheap, call it often."""
    if not self.multihost and self._flag.is_set():
      raise Interrupted('preemption requested')

  def should_stop(self, step: int) -> bool:
    """Polled once per step; True when the loop must save and exit.

    In multi-process runs every process must call it at every step (it is
    collective-consistent: all processes get True at the same step).
    """
    if not self.multihost:
      return self._flag.is_set()
    if self._sync_broken:
      return False
    try:
      hit = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    except RuntimeError as e:
      # No coordination service (e.g. distributed not initialised): the
      # processes cannot agree on a step, so never stop on a local signal.
      logging.warning('preemption sync unavailable, preemption ignored: %s',
                      e)
      self._sync_broken = True
      return False
    if hit:
      self._flag.set()
    return hit
