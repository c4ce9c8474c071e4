"""A training workdir from the trainer's side: the lock of the trainer that owns it, and its
checkpoints opened read-only.

The names inside a workdir are `workdir_layout`'s; loading a model for inference reads workdirs
through `model_io` and never comes here. `read_checkpoints` is for training code (stage 2 loading
its first stage): it creates, deletes and renames nothing, so it is safe while a run saves.

One trainer per workdir: `TrainerLock` holds an exclusive `flock` on `<workdir>/trainer.lock`. The
kernel drops the lock when the holding process ends, however it ends (kill -9 included), so a
crash never leaves a stuck lock; the file itself stays and records the holder (pid, host, start
time) for the error message of the trainer that is refused. Multi-host runs: every host runs
train.py on the same workdir, so only process 0 takes the lock; and a workdir on an object store
(gs://...) is not locked at all, since flock does not exist there (nor, with a warning, on a mount
that refuses flock).
"""

import datetime
import fcntl
import json
import logging
import os
import socket

import jax

from ldm_jax import workdir_layout as layout
# pylint: disable-next=unused-import
from ldm_jax.errors import WorkdirBusyError
from ldm_jax.train import checkpoint as checkpoint_lib

log = logging.getLogger("ldm_jax.train")

# The names the trainer's modules use; the values are workdir_layout's.
CHECKPOINT_SUBDIR = layout.CHECKPOINTS_DIR
LOCK_FILE = layout.LOCK_FILE


def read_checkpoints(workdir: str) -> checkpoint_lib.Checkpointer | None:
  """The workdir's checkpoints opened read-only (close it after use), or None if it has none."""
  ckpt_dir = layout.checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    return None
  return checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)


class TrainerLock:
  """Context manager: the exclusive right to train in `workdir` (see the module docstring).

  Raises WorkdirBusyError on entry when another live process holds it.
  """

  def __init__(self, workdir: str):
    self.workdir = os.fspath(workdir)
    self.path = layout.lock_path(self.workdir)
    self._fd: int | None = None

  def applies(self) -> bool:
    """Process 0 of a run on a local (or mounted) filesystem; see the module docstring."""
    return "://" not in self.workdir and jax.process_index() == 0

  def acquire(self) -> None:
    if not self.applies() or self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    # Not inheritable (Python's default): a child process must not keep the lock alive.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by another trainer ({holder}); two runs in one "
          f"workdir would overwrite each other's checkpoints. Wait for it to finish, stop it, or "
          f"choose another --workdir.") from None
    except OSError as e:
      # A filesystem without locks (some FUSE mounts of object stores): the run goes on, as it
      # would on gs:// itself, rather than refusing a workdir nobody else may be using.
      os.close(fd)
      log.warning("cannot lock %s (%s): this workdir is not protected against a second trainer.",
                  self.path, e)
      return
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      # The file stays: removing it would let a third process lock a new file while a second
      # still waits on the old one.
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "TrainerLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  """'pid 123 on host h since ...' from the lock file, or what is known when it cannot be read."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {info['pid']} on host {info['host']} since {info['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown: the lock file names no process yet"
