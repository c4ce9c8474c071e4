"""A live workdir: readers never write into it, one trainer per workdir, a half-published model.

The runs are real train.py processes (the tiny stage-1 and stage-2 settings of
test_train_resume.py) sharing one compilation cache:

  * a stage-2 run is held inside its asynchronous save (as in test_train_kill.py) while the
    workdir is opened for sampling; released, it must finish that save;
  * every reader (sampling, evaluation, stage 2's first-stage loading) leaves the files of a
    workdir exactly as they were, crashed saves' tmp directories included;
  * a second train.py on a locked workdir exits with code 2 and one line naming the holder,
    having written nothing; a lock whose holder was killed is free again;
  * a model directory holding params/ but no config.json (a crash between the two writes) is
    written again by the next start instead of stopping it.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

import test_train_kill as kill
import test_train_resume as resume
from ldm_jax import ldm
from ldm_jax import model_io
from ldm_jax.train import ae_trainer
from ldm_jax.train import workdir as workdir_lib

REPO = kill.REPO
# test_train_kill.py's process wrapper (pauses inside Orbax's commit) and checkpoint listings.
# pylint: disable-next=protected-access
_Run, _complete, _listing, _env = kill._Run, kill._complete, kill._listing, kill._env
TIMEOUT = 300
# Stage 2 on the 16 px stage-1 model of resume.TINY, as in test_train_resume.py.
LDM = ["--config=configs/shapes_ldm_text.py:tiny", "--config.data.image_size=16",
       "--config.model.first_stage.kwargs.resolution=16",
       "--config.model.first_stage.kwargs.ch_mult=(1,)", "--config.data.batch_size=4",
       "--config.model.unet.model_channels=32", "--config.model.unet.channel_mult=(1,2)",
       "--config.model.unet.attention_resolutions=(2,)",
       "--config.model.diffusion.image_size=16", "--config.model.cond_stage.kwargs.depth=1",
       "--config.checkpoint.every=1"]


def _train(args, env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{'env', 'ae': stage-1 workdir (1 step), 'ldm': stage-2 workdir (1 step), 'ldm_args'}."""
  root = tmp_path_factory.mktemp("live_workdir")
  env = _env(root / "jax_cache")
  ae = root / "ae"
  out = _train([*resume.TINY, "--config.train.num_steps=1", f"--workdir={ae}"], env)
  assert out.returncode == 0, out.stderr[-4000:]
  ldm_args = [*LDM, f"--config.first_stage_checkpoint={ae}"]
  out = _train([*ldm_args, "--config.train.num_steps=1", f"--workdir={root / 'ldm'}"], env)
  assert out.returncode == 0, out.stderr[-4000:]
  return {"env": env, "ae": ae, "ldm": root / "ldm", "ldm_args": ldm_args}


def _tree(root: pathlib.Path) -> dict[str, tuple]:
  """Every file and directory under root: path -> (size, mtime) of files, () of directories."""
  out = {}
  for path in root.rglob("*"):
    rel = str(path.relative_to(root))
    out[rel] = () if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
  return out


def test_sampling_a_workdir_mid_save_lets_the_save_finish(runs, tmp_path):
  workdir = tmp_path / "ldm"
  shutil.copytree(runs["ldm"], workdir)
  release = tmp_path / "release"
  run = _Run(workdir, runs["env"], tmp_path / "run.log", pause="commit:2", release=release,
             args=[*runs["ldm_args"], "--config.train.num_steps=2", f"--workdir={workdir}"])
  try:
    marker = run.wait_marker("PAUSED commit")
    tmp_dir = pathlib.Path(marker.split(maxsplit=2)[2])
    assert tmp_dir.is_dir() and tmp_dir.name.startswith("2.orbax-checkpoint-tmp"), marker
    # What sample.py --checkpoint <workdir> does: the model with the newest complete weights.
    model = ldm.LatentDiffusion.from_checkpoint(str(workdir))
    assert model.config.unet.model_channels == 32
    _, params = model_io.load_model(str(workdir))
    assert "unet" in params
    assert tmp_dir.is_dir(), "a reader removed the in-flight save"
    release.touch()
    log = run.finish()
  finally:
    run.close()
  assert "CheckpointSaveError" not in log, log[-3000:]
  assert _complete(workdir) == [1, 2], _listing(workdir)
  assert not tmp_dir.exists()  # Published as 2 by the trainer itself.


def test_readers_create_and_delete_nothing(runs, tmp_path):
  ae, ldm_dir = tmp_path / "ae", tmp_path / "ldm"
  shutil.copytree(runs["ae"], ae)
  shutil.copytree(runs["ldm"], ldm_dir)
  # What a save in flight (or a crashed one) looks like to a reader.
  for workdir in (ae, ldm_dir):
    leftover = workdir / "checkpoints" / "7.orbax-checkpoint-tmp-12" / "state"
    leftover.mkdir(parents=True)
    (leftover / "part").write_bytes(b"written so far")
  before = {str(w): _tree(w) for w in (ae, ldm_dir)}

  ldm.LatentDiffusion.from_checkpoint(str(ldm_dir))  # sample.py / evaluate.py --checkpoint
  model_io.load_model(str(ldm_dir), use_ema=False)
  assert model_io.restore_trained_params(str(ldm_dir))["unet"]
  ae_trainer.load_autoencoder(str(ae))  # Stage 2's config.first_stage_checkpoint.
  for path in (ae, ldm_dir):  # evaluate.py autoencoder --checkpoint
    _, variables = model_io.load_first_stage(str(path))
    assert variables["params"]

  assert {str(w): _tree(w) for w in (ae, ldm_dir)} == before
  # A read-only open of a missing checkpoint directory fails instead of creating it.
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    workdir_lib.checkpoint_lib.Checkpointer(tmp_path / "none", read_only=True)
  assert not (tmp_path / "none").exists()


def test_second_trainer_is_refused_with_one_line(runs, tmp_path):
  workdir = tmp_path / "busy"
  with workdir_lib.TrainerLock(str(workdir)):
    out = _train([*resume.TINY, "--config.train.num_steps=1", f"--workdir={workdir}"],
                 runs["env"])
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: workdir {workdir} is in use by another trainer "
                           f"(pid {os.getpid()} on host "), last
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]  # Nothing else written.
  # The refused run took nothing with it: the lock is free once its holder lets go. (That a
  # killed train.py frees it is what test_train_kill.py's resumed runs rely on.)
  with workdir_lib.TrainerLock(str(workdir)):
    pass


def test_lock_in_process_and_after_a_killed_holder(tmp_path):
  workdir = str(tmp_path / "w")
  first = workdir_lib.TrainerLock(workdir)
  first.acquire()
  with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {os.getpid()} on host "):
    workdir_lib.TrainerLock(workdir).acquire()
  first.release()
  with workdir_lib.TrainerLock(workdir):  # Free again once released.
    pass

  # A holder killed with SIGKILL never releases anything itself: the kernel drops its lock.
  code = ("import sys, time; from ldm_jax.train import workdir as w; "
          f"w.TrainerLock({workdir!r}).acquire(); print('LOCKED', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  try:
    assert proc.stdout.readline().strip() == "LOCKED"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {proc.pid} "):
      workdir_lib.TrainerLock(workdir).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  with workdir_lib.TrainerLock(workdir) as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()  # The file now names its new holder.


def test_lock_skipped_where_flock_does_not_apply(monkeypatch, tmp_path):
  # Object stores have no flock; the lock must not try to create gs://... as a local path.
  with workdir_lib.TrainerLock("gs://bucket/run") as lock:
    assert not lock.applies()
  # Multi-host: only process 0 takes it (all hosts run train.py on the same workdir).
  monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: 1)
  with workdir_lib.TrainerLock(str(tmp_path)):
    with workdir_lib.TrainerLock(str(tmp_path)):
      pass
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_half_published_model_is_written_again(runs, tmp_path):
  # A crash between model/params and model/config.json, on the first start.
  workdir = tmp_path / "ldm"
  shutil.copytree(runs["ldm"] / model_io.MODEL_SUBDIR / "params",
                  workdir / model_io.MODEL_SUBDIR / "params")
  out = _train([*runs["ldm_args"], "--config.train.num_steps=1", f"--workdir={workdir}"],
               runs["env"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "a save was interrupted" in out.stderr
  config, params = model_io.load_saved_model(str(workdir / model_io.MODEL_SUBDIR))
  assert config.unet.model_channels == 32 and params["unet"]
