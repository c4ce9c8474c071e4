"""kill -9 of train.py between checkpoints and in the middle of an asynchronous save.

One chain of real train.py processes (stage 1, tiny, 8 steps, a checkpoint every 2 steps):

  run 1  SIGKILL after step 3, once checkpoint 2 is complete (between checkpoints 2 and 4);
  run 2  the same command resumes from 2; SIGKILL while the async save of step 6 is half done:
         its arrays and metadata are written into `6.orbax-checkpoint-tmp`, the rename that
         publishes it as `6` has not happened;
  run 3  the same command removes the half-written 6, resumes from 4 and finishes step 8,

and the result must equal an uninterrupted 8-step run (run alongside): every state leaf within
1e-6, every logged loss identical.

To land the kills at known points this file doubles as a wrapper around train.py (see `__main__`
below): `LDM_KILL_TEST_PAUSE=before_step:N` blocks the data fetch of step N and prints
`PAUSED before_step N`; `LDM_KILL_TEST_PAUSE=commit:N` blocks Orbax's background save thread of
step N just before it renames the tmp directory and prints `PAUSED commit <tmp dir>`. A pause only
waits (until the file named by `LDM_KILL_TEST_RELEASE` appears); the test checks on disk that each
kill really landed where it should.
"""

import os
import pathlib
import runpy
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
PAUSE_VAR, RELEASE_VAR = "LDM_KILL_TEST_PAUSE", "LDM_KILL_TEST_RELEASE"
PAUSE_SECS = 600   # The longest pause: the test kills or releases the process long before.
TIMEOUT = 240      # Per process, as a watchdog. The test spends ~50 s of CPU in all (4 processes).
STEPS, EVERY = 8, 2


def _env(cache_dir) -> dict:
  """One CPU device (the sharded restore has its own test) and a shared compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(PAUSE_VAR, None)
  env.pop(RELEASE_VAR, None)
  return env


def _args(workdir) -> list[str]:
  # The stage-1 settings of test_train_resume.py (16 px, one level, a 1-layer discriminator).
  import test_train_resume as resume  # pylint: disable=import-outside-toplevel
  return [*resume.TINY, f"--config.checkpoint.every={EVERY}", f"--config.train.num_steps={STEPS}",
          f"--workdir={workdir}"]


def _listing(workdir) -> list[str]:
  path = pathlib.Path(workdir) / "checkpoints"
  return sorted(os.listdir(path)) if path.is_dir() else []


def _complete(workdir) -> list[int]:
  """Published step directories holding Orbax's finished-checkpoint metadata (read-only look)."""
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(n) for n in _listing(workdir)
                if n.isdigit() and (root / n / "_CHECKPOINT_METADATA").exists())


def _tmp_dirs(workdir, step=None) -> list[str]:
  prefix = f"{step}.orbax-checkpoint-tmp" if step is not None else ""
  return [n for n in _listing(workdir) if ".orbax-checkpoint-tmp" in n and n.startswith(prefix)]


class _Run:
  """train.py (through this file's wrapper when `pause` is set), stderr kept in a file."""

  def __init__(self, workdir, env, log_path, pause=None, release=None, args=None):
    """args: train.py's flags (default: the tiny stage-1 run of this file in `workdir`)."""
    self.log_path = log_path
    env = dict(env, **({PAUSE_VAR: pause, RELEASE_VAR: str(release)} if pause else {}))
    cmd = [sys.executable, __file__] if pause else [sys.executable, "train.py"]
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(cmd + (args or _args(workdir)), cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=self._log)
    self._watchdog = threading.Timer(TIMEOUT, self.proc.kill)
    self._watchdog.start()

  def log(self) -> str:
    return pathlib.Path(self.log_path).read_text()

  def wait_marker(self, prefix: str) -> str:
    """The first stdout line starting with `prefix` (fails if the process ends first)."""
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line.strip()
    self.proc.wait()
    pytest.fail(f"no {prefix!r} line; exit code {self.proc.returncode}:\n{self.log()[-3000:]}")

  def kill9(self) -> None:
    self.proc.send_signal(signal.SIGKILL)
    assert self.proc.wait(timeout=60) == -signal.SIGKILL

  def finish(self) -> str:
    """Waits for a normal exit; returns stderr."""
    self.proc.communicate(timeout=TIMEOUT)
    assert self.proc.returncode == 0, self.log()[-4000:]
    return self.log()

  def close(self) -> None:
    self._watchdog.cancel()
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self._log.close()


def test_kill9_between_checkpoints_and_mid_async_save_resumes_exactly(tmp_path):
  import test_train_resume as resume  # pylint: disable=import-outside-toplevel
  env = _env(tmp_path / "jax_cache")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  runs = []
  try:
    # Run 1: killed after step 3, between checkpoints 2 and 4.
    run = _Run(killed, env, tmp_path / "run1.log", pause="before_step:4")
    runs.append(run)
    run.wait_marker("PAUSED before_step 4")
    # The uninterrupted run, alongside the rest, once run 1 has filled the compilation cache.
    baseline = _Run(straight, env, tmp_path / "straight.log")
    runs.append(baseline)
    deadline = time.time() + 60
    while _complete(killed) != [2]:  # Its async save may still be finishing.
      assert time.time() < deadline, f"checkpoint 2 never completed: {_listing(killed)}"
      time.sleep(0.05)
    run.kill9()
    assert _listing(killed) == ["2"], _listing(killed)  # Nothing of step 4 began.

    # Run 2: resumes from 2; killed while the async save of step 6 is half done.
    run = _Run(killed, env, tmp_path / "run2.log", pause="commit:6")
    runs.append(run)
    marker = run.wait_marker("PAUSED commit")
    tmp_dir = pathlib.Path(marker.split(maxsplit=2)[2])
    # The kill lands mid-save: step 6 exists only as a tmp directory, already holding the
    # written state (what a crash just before the final rename leaves).
    assert tmp_dir.parent.name == "checkpoints" and tmp_dir.name in _tmp_dirs(killed, 6), marker
    assert any((tmp_dir / "state").iterdir()), "the paused save wrote no state files"
    run.kill9()
    assert "at step 2" in run.log(), run.log()[-3000:]
    assert _complete(killed) == [2, 4], _listing(killed)
    assert _tmp_dirs(killed) == [tmp_dir.name], _listing(killed)  # Left behind by the kill.

    # Run 3: the same command resumes from the last complete checkpoint, 4, and finishes. Held
    # before step 5 to see that start-up removed the half-written save (re-saving step 6 would
    # also replace it: Orbax reuses the name `6.orbax-checkpoint-tmp`).
    release = tmp_path / "release"
    run = _Run(killed, env, tmp_path / "run3.log", pause="before_step:5", release=release)
    runs.append(run)
    run.wait_marker("PAUSED before_step 5")
    assert "at step 4" in run.log(), run.log()[-3000:]
    assert _listing(killed) == ["2", "4"], _listing(killed)
    release.touch()
    run.finish()
    assert _listing(killed) == ["4", "6", "8"]  # Complete (keep=3), no tmp directory left.
    assert _complete(killed) == [4, 6, 8], _listing(killed)

    baseline.finish()
  finally:
    for r in runs:
      r.close()

  (step_a, state_a), (step_b, state_b) = resume._final(straight), resume._final(killed)
  assert step_a == step_b == STEPS
  # The whole state: params, discriminator, both optimisers' moments, step and RNG.
  assert resume._max_diff(state_a, state_b) <= 1e-6
  # Every step's loss, including those re-run after each resume, as logged last.
  assert resume._losses(killed) == resume._losses(straight)
  assert sorted(resume._losses(killed)) == list(range(1, STEPS + 1))
  # Training moved the parameters, so the comparison is not between two untouched states.
  with resume.ckpt_lib.Checkpointer(killed / "checkpoints", async_save=False) as ckpt:
    params_4 = jax.tree.map(np.asarray, ckpt.restore(4)[0]["params"])
  assert resume._max_diff(params_4, state_a["params"]) > 1e-4


# -- the wrapper: `python test_train_kill.py <train.py flags>` with LDM_KILL_TEST_PAUSE set -------


def _pause(what: str) -> None:
  """Prints the marker, then waits until the file named by $LDM_KILL_TEST_RELEASE exists."""
  print("PAUSED", what, flush=True)
  release = pathlib.Path(os.environ.get(RELEASE_VAR, "/nonexistent"))
  deadline = time.time() + PAUSE_SECS
  while not release.exists() and time.time() < deadline:
    time.sleep(0.05)


def _pause_before_step(step: int) -> None:
  """Blocks the data fetch of training step `step` (the trainers call loop.run_loop by keyword)."""
  from ldm_jax.train import loop  # pylint: disable=import-outside-toplevel
  run_loop = loop.run_loop

  def paused_run_loop(**kwargs):
    next_batch, fetched = kwargs["next_batch"], [kwargs["start_step"]]

    def next_batch_paused():
      fetched[0] += 1  # The step this batch trains.
      if fetched[0] == step:
        _pause(f"before_step {step}")
      return next_batch()

    return run_loop(**dict(kwargs, next_batch=next_batch_paused))

  loop.run_loop = paused_run_loop


def _pause_commit(step: int) -> None:
  """Blocks Orbax's background thread after it wrote step `step`, before it publishes it."""
  # Orbax 0.12's async finalisation: written tmp dir -> _on_commit_callback -> rename.
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.checkpointers import async_checkpointer
  commit = async_checkpointer._on_commit_callback  # pylint: disable=protected-access

  def paused_commit(tmpdir, *args, **kwargs):
    if tmpdir.get_final().name == str(step):
      _pause(f"commit {tmpdir.get()}")
    return commit(tmpdir, *args, **kwargs)

  async_checkpointer._on_commit_callback = paused_commit  # pylint: disable=protected-access


if __name__ == "__main__":
  _kind, _step = os.environ[PAUSE_VAR].split(":")
  {"before_step": _pause_before_step, "commit": _pause_commit}[_kind](int(_step))
  sys.argv = ["train.py", *sys.argv[1:]]
  runpy.run_path(str(REPO / "train.py"), run_name="__main__")
