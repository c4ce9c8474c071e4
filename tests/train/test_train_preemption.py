"""PreemptionGuard in-process, and SIGTERM -> save -> exit 0 -> resume."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import preemption

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent


def test_guard_sets_flag_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)  # Would kill pytest if unhandled.
    assert guard.requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is before


def _start(workdir, max_steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
  return subprocess.Popen(
      [sys.executable, str(HERE / 'ldm_train_preempt_loop.py'), str(workdir),
       str(max_steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=env, cwd=str(REPO))


def _fields(lines, tag):
  return [l.split()[1:] for l in lines if l.startswith(tag + ' ')]


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  proc = _start(tmp_path, 10**6)
  lines = []
  try:
    for line in proc.stdout:  # Wait until it has taken a few steps.
      lines.append(line.strip())
      if line.startswith('STEP 3'):
        break
    else:
      pytest.fail('loop ended early: ' + proc.stderr.read()[-3000:])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  lines += out.splitlines()
  assert proc.returncode == 0, err[-3000:]
  (saved_step, saved_sum), = _fields(lines, 'SAVED')
  saved_step = int(saved_step)
  assert saved_step >= 3
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == saved_step

  # A second run picks up where the first stopped and finishes.
  proc = _start(tmp_path, saved_step + 2)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  lines = out.splitlines()
  (resumed_step, resumed_sum), = _fields(lines, 'RESUMED')
  assert int(resumed_step) == saved_step
  assert float(resumed_sum) == float(saved_sum)  # Same params, bit for bit.
  assert [int(s) for s, in _fields(lines, 'STEP')] == [saved_step + 1,
                                                        saved_step + 2]
  assert int(_fields(lines, 'DONE')[0][0]) == saved_step + 2
