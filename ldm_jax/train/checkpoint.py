"""Orbax checkpoints of the TrainState plus a JSON side-car.

A thin wrapper over `orbax.checkpoint.CheckpointManager` (0.12 API): each
step directory holds two items, 'state' (the TrainState through
`StandardSave`, sharded arrays written by every host) and 'extra' (a JSON
dict: data-iterator state, config, anything small).

Safety, which the tests check:
  * Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames
    it when complete, so a crash mid-save leaves only a tmp directory, which
    is never listed or restored; `latest_step` also ignores step directories
    that lack the finished-checkpoint files.
  * A failed save (disk full, permissions) raises `CheckpointSaveError`,
    deletes its own tmp directory and leaves earlier checkpoints untouched.
  * Restoring takes an abstract target whose leaves carry shardings, so a
    state saved on one mesh restores onto any other mesh.
  * A reader (`read_only=True`: sampling, evaluation, stage 2 loading its
    first stage) creates, removes and renames nothing, so it can open the
    workdir of a run that is saving right now; only the trainer's
    Checkpointer cleans up tmp directories of crashed saves.
  * `restore_newest` falls back to the previous complete step when the
    newest cannot be read, and moves the unreadable one aside (renamed,
    never deleted) so the resumed run can write that step again.
"""

import logging as std_logging
import os
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from ldm_jax import workdir_layout as layout
from ldm_jax.errors import CheckpointRestoreError

_STATE, _EXTRA = layout.STATE_ITEM, layout.EXTRA_ITEM
_TMP_MARKER = '.orbax-checkpoint-tmp'
_DONE_FILE = layout.STEP_DONE_FILE  # Written by Orbax inside every step.
# A step directory that could not be restored is renamed `<step>.unreadable`:
# Orbax lists only names that are (or end in `_`) digits, so it disappears
# from every listing while its files stay on disk for inspection.
_UNREADABLE_SUFFIX = '.unreadable'


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed; earlier checkpoints are intact."""


def abstract_like(tree: Any, shardings: Optional[Any] = None) -> Any:
  """ShapeDtypeStructs for `tree`, with `shardings` (a tree) or the leaves'.

  Use it to build a restore target for another mesh:
  `abstract_like(jax.eval_shape(init), infer_param_shardings(..., mesh))`.
  """
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, 'sharding', None)),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


class _DropReadOnlyNotice(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


class Checkpointer:
  """Saves and restores (TrainState, extra JSON) under `workdir`.

  Args:
    workdir: directory of step subdirectories (created if missing; any
      path epath understands, e.g. gs://...).
    max_to_keep: keep only the newest this many checkpoints (None: all).
    save_every: `save` writes only on multiples of this (unless forced).
    async_save: write in a background thread; call `wait()` before exit.
    read_only: open for reading only: the directory must exist, and nothing
      in it is created, removed or renamed (a running trainer's in-flight
      save stays untouched); `save` raises.
  """

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3,
               save_every: int = 1, async_save: bool = True,
               read_only: bool = False):
    if save_every < 1:
      raise ValueError(f'save_every={save_every}: expected >= 1')
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep={max_to_keep}: expected >= 1 or None')
    self.workdir = os.fspath(workdir)
    if "://" not in self.workdir:  # Orbax wants absolute local paths; keep URLs (gs://) as given.
      self.workdir = os.path.abspath(self.workdir)
    self.read_only = bool(read_only)
    if self.read_only:
      if not epath.Path(self.workdir).is_dir():
        raise FileNotFoundError(f'{self.workdir}: no checkpoint directory')
      # Orbax's defaults already skip cleanup and creation; spelled out
      # because a reader that removed `<step>.orbax-checkpoint-tmp` would
      # kill the trainer whose save is in flight.
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False,
          max_to_keep=None, save_interval_steps=0,
          enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          # The interval is applied in `save`: Orbax would also save the
          # first step it sees, whatever its number.
          max_to_keep=max_to_keep, save_interval_steps=1,
          enable_async_checkpointing=async_save,
          # Leftovers of crashed saves are removed when a run starts (only
          # the trainer opens the directory writable: see `read_only`).
          cleanup_tmp_directories=True)
    quiet = _DropReadOnlyNotice()
    # Orbax warns that a read-only directory is read-only; for sample.py's users that is noise.
    logging.get_absl_logger().addFilter(quiet)
    try:
      self._manager = ocp.CheckpointManager(
          self.workdir, options=options, item_names=(_STATE, _EXTRA))
    finally:
      logging.get_absl_logger().removeFilter(quiet)
    self.save_every = int(save_every)
    self._pending: Optional[int] = None

  # -- listing -------------------------------------------------------------

  def _is_complete(self, step: int) -> bool:
    step_dir = epath.Path(self.workdir) / str(step)
    return (step_dir / _DONE_FILE).exists() and (step_dir / _STATE).is_dir()

  def all_steps(self) -> List[int]:
    """Complete checkpoints on disk, oldest first."""
    self._manager.reload()
    return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

  def latest_step(self) -> Optional[int]:
    """Newest complete checkpoint step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- saving --------------------------------------------------------------

  def save(self, step: int, state: Any,
           extra_json: Optional[Dict[str, Any]] = None,
           force: bool = False) -> bool:
    """Starts saving `state` and `extra_json` as checkpoint `step`.

    Returns True if a save was started: only on multiples of `save_every`
    unless `force`, and never over an existing step (then False). With
    async saving, errors of this save surface in the next `save` or `wait`.

    Raises:
      CheckpointSaveError: the write failed (tmp files removed, earlier
        checkpoints intact).
    """
    if self.read_only:
      raise ValueError(f'{self.workdir} was opened read_only: cannot save '
                       f'step {step}')
    step = int(step)
    if not force and step % self.save_every:
      return False
    self._raise_pending_failure()
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _EXTRA: ocp.args.JsonSave(dict(extra_json or {})),
    })
    try:
      started = self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    if started:
      self._pending = step
    return bool(started)

  def wait(self) -> None:
    """Blocks until the in-flight save is on disk; raises if it failed."""
    self._raise_pending_failure()

  def _raise_pending_failure(self) -> None:
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)

  def _fail(self, step: Optional[int], error: Exception) -> None:
    if jax.process_index() == 0 and step is not None:
      prefix = f'{step}{_TMP_MARKER}'
      for path in epath.Path(self.workdir).iterdir():
        if path.name.startswith(prefix):
          try:
            path.rmtree()
          except OSError:  # Best effort: a full disk may refuse this too.
            logging.warning('could not remove %s', path)
    previous = [s for s in self.all_steps() if s != step]
    raise CheckpointSaveError(
        f'saving checkpoint step {step} under {self.workdir} failed: '
        f'{type(error).__name__}: {error}. Previous checkpoints are intact '
        f'(latest complete step: {previous[-1] if previous else None}).'
    ) from error

  # -- restoring -----------------------------------------------------------

  def restore(self, step: Optional[int] = None,
              target_state: Optional[Any] = None) -> Tuple[Any, Dict]:
    """Loads checkpoint `step` (default: the latest complete one).

    Args:
      step: which step; must be a complete checkpoint.
      target_state: pytree like the saved state (e.g. a TrainState) of
        arrays or ShapeDtypeStructs; each leaf's sharding decides where the
        restored array lives, so any mesh works (see `abstract_like`).
        None restores the saved tree as Orbax stores it (nested dicts of
        host-local arrays), for inspection.

    Returns:
      (state, extra_json).

    Raises:
      FileNotFoundError: no complete checkpoint, or `step` is not one.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f'no complete checkpoint under {self.workdir}')
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(
          f'checkpoint step={step} not found (or incomplete) under '
          f'{self.workdir}; complete steps: {steps}')
    if target_state is None:
      state_args = ocp.args.StandardRestore()
    else:
      state_args = ocp.args.StandardRestore(abstract_like(target_state))
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        _STATE: state_args, _EXTRA: ocp.args.JsonRestore()}))
    logging.info('Restored checkpoint step %d from %s', step, self.workdir)
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def restore_newest(self, target_state: Optional[Any] = None
                     ) -> Tuple[Any, Dict, int]:
    """The newest complete checkpoint that can be read: (state, extra, step).

    A step that raises while restoring is logged (step and error) and the
    next older one is tried. Once one restores, the unreadable newer steps
    are renamed `<step>.unreadable` (files kept) so this run can save those
    step numbers again; with none readable nothing is renamed.

    Raises:
      FileNotFoundError: no complete checkpoint.
      CheckpointRestoreError: none of the complete checkpoints restores.
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint under {self.workdir}')
    failures = []
    for step in reversed(steps):
      try:
        state, extra = self.restore(step, target_state)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for damaged files (ValueError, OSError,
        # KeyError, tensorstore errors...).
        first_line = str(e).splitlines()[0] if str(e) else ''
        failures.append(f'step {step}: {type(e).__name__}: {first_line}')
        logging.warning('Checkpoint step %d under %s cannot be restored '
                        '(%s: %s); trying the previous one.', step,
                        self.workdir, type(e).__name__, first_line)
        continue
      if failures:
        logging.warning('Resumed from checkpoint step %d under %s instead of '
                        'the newest, unreadable: %s', step, self.workdir,
                        '; '.join(failures))
        self._set_aside([s for s in steps if s > step])
      return state, extra, step
    raise CheckpointRestoreError(
        f'no checkpoint under {self.workdir} can be restored: '
        f'{"; ".join(failures)}. Move the workdir aside to start afresh, or '
        f'restore with the config that wrote it.')

  def _set_aside(self, steps: List[int]) -> None:
    """Renames unreadable step directories out of Orbax's sight."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      root = epath.Path(self.workdir)
      for step in steps:
        target = root / f'{step}{_UNREADABLE_SUFFIX}'
        n = 1
        while target.exists():  # An earlier fallback set this step aside too.
          target = root / f'{step}{_UNREADABLE_SUFFIX}-{n}'
          n += 1
        (root / str(step)).rename(target)
        logging.warning('Moved unreadable checkpoint %s to %s', root / str(step),
                        target)
    if jax.process_count() > 1:
      # Every process must see the renames before it lists steps to save.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('ldm_jax_checkpoint_set_aside')
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
