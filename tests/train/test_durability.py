"""Durability corners of a workdir: an unreadable newest checkpoint, atomic side-car files,
first_stage.json written once, a half-published model, SIGTERM during an evaluation phase."""

import json
import logging
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

import ldm_train_toy as toy
from configs import shapes_autoencoder
from configs import shapes_ldm_text
from ldm_jax.eval import image_sets
from ldm_jax.eval import sample_eval
from ldm_jax import model_io
from ldm_jax.train import ae_trainer
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import eval_hook
from ldm_jax.train import loop
from ldm_jax.train import optim
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib

_TX = optim.make_optimizer(learning_rate=1e-2)
_STEP = step_lib.make_train_step(toy.loss_fn, _TX, donate=False)


def _state():
  return state_lib.create_train_state(toy.init_params(), _TX, jax.random.PRNGKey(0))


def _corrupt(step_dir) -> None:
  """Zeroes every file of a step's state (what a bad disk or a truncated copy leaves)."""
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


def _three_checkpoints(root):
  """Checkpoints 1, 2, 3 of a toy run; returns the states saved, by step."""
  states, state = {}, _state()
  with ckpt_lib.Checkpointer(root) as ckpt:
    for step in (1, 2, 3):
      state, _ = _STEP(state, toy.make_batch(step))
      ckpt.save(step, state, {"data": {"position": step}})
      states[step] = jax.device_get(state)
  return states


# -- an unreadable newest checkpoint --------------------------------------------------------------


class _Loader:
  data_state = None

  def set_state(self, state):
    self.data_state = state


def test_resume_falls_back_past_unreadable_checkpoints(tmp_path, caplog):
  root = tmp_path / "checkpoints"
  states = _three_checkpoints(root)
  _corrupt(root / "3")
  _corrupt(root / "2")
  loader = _Loader()
  with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(root) as ckpt:
    state, start = loop.resume(ckpt, _state(), loader, str(tmp_path))
    assert start == 1 and loader.data_state == {"position": 1}
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(states[1].params)):
      np.testing.assert_array_equal(np.asarray(a), b)
    # Both failures are reported, by step, with what went wrong.
    text = caplog.text
    assert "step 3 under" in text and "step 2 under" in text and "cannot be restored" in text
    assert "Resumed from checkpoint step 1" in text
    # Set aside, not deleted; the run can write steps 2 and 3 again.
    assert sorted(os.listdir(root)) == ["1", "2.unreadable", "3.unreadable"]
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, state, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 2


def test_resume_with_no_readable_checkpoint_raises_and_renames_nothing(tmp_path):
  root = tmp_path / "checkpoints"
  _three_checkpoints(root)
  for step in (1, 2, 3):
    _corrupt(root / str(step))
  with ckpt_lib.Checkpointer(root) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointRestoreError,
                       match=r"no checkpoint under .* can be restored: step 3: .*step 1: "):
      loop.resume(ckpt, _state(), _Loader(), str(tmp_path))
  assert sorted(os.listdir(root)) == ["1", "2", "3"]


def test_reader_falls_back_without_renaming(tmp_path):
  root = tmp_path / "checkpoints"
  states = _three_checkpoints(root)
  _corrupt(root / "3")
  with ckpt_lib.Checkpointer(root, read_only=True) as ckpt:
    state, _, step = ckpt.restore_newest()
    with pytest.raises(ValueError, match="read_only"):
      ckpt.save(4, state)
  assert step == 2
  np.testing.assert_array_equal(state["step"], states[2].step)
  assert sorted(os.listdir(root)) == ["1", "2", "3"]


# -- side-car files ------------------------------------------------------------------------------


def test_write_text_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  model_io.write_text_atomic(str(path), '{"a": 1}')
  assert json.loads(path.read_text()) == {"a": 1}

  def no_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(model_io.os, "fsync", no_disk)
  with pytest.raises(OSError, match="No space"):
    model_io.write_text_atomic(str(path), '{"a": 2, "long": "' + "x" * 10000 + '"}')
  assert json.loads(path.read_text()) == {"a": 1}  # Untouched, never half-written.
  assert os.listdir(tmp_path) == ["config.json"]  # No temporary file left behind.


def test_workdir_config_and_summary_are_written_atomically(tmp_path, monkeypatch):
  cfg = shapes_autoencoder.get_config("tiny")
  loop.write_config(str(tmp_path), cfg)
  first = (tmp_path / "config.json").read_text()
  assert json.loads(first)["stage"] == "autoencoder"
  replaced = []
  real_replace = os.replace
  monkeypatch.setattr(model_io.os, "replace", lambda a, b: (replaced.append(b), real_replace(a, b)))
  cfg.unlock()
  cfg.train.num_steps = 12345
  loop.write_config(str(tmp_path), cfg)
  assert replaced == [str(tmp_path / "config.json")]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 12345
  loop.write_summary(str(tmp_path), {"step": 3, "loss": np.float32(0.5)})
  assert replaced[-1] == str(tmp_path / "summary.json")
  assert json.loads((tmp_path / "summary.json").read_text()) == {"step": 3.0, "loss": 0.5}


def test_first_stage_json_is_written_once(tmp_path, caplog):
  cfg = shapes_autoencoder.get_config("tiny")
  path = tmp_path / ae_trainer.FIRST_STAGE_FILE
  ae_trainer.save_first_stage_config(str(tmp_path), cfg)
  written = path.read_text()
  stamp = path.stat().st_mtime_ns
  assert (ae_trainer.read_first_stage_config(str(tmp_path)).to_json(sort_keys=True) ==
          cfg.model.first_stage.to_json(sort_keys=True))
  # A resume with the same config leaves the file alone (readers may be reading it).
  ae_trainer.save_first_stage_config(str(tmp_path), cfg)
  assert path.stat().st_mtime_ns == stamp
  # One with another first stage keeps the file its checkpoints were written with, and says so.
  other = shapes_autoencoder.get_config("tiny")
  other.model.first_stage.kwargs.embed_dim = 7
  with caplog.at_level(logging.WARNING):
    ae_trainer.save_first_stage_config(str(tmp_path), other)
  assert path.read_text() == written
  assert "keeping the file the checkpoints were written with" in caplog.text
  # An unreadable leftover (a torn write of an older version) is replaced.
  path.write_text('{"kind": "k')
  ae_trainer.save_first_stage_config(str(tmp_path), cfg)
  assert path.read_text() == written


def test_save_model_over_a_half_published_directory(tmp_path):
  cfg = shapes_autoencoder.get_config("tiny").model  # Any config: save_model does not check it.
  params = {"unet": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  model_dir = tmp_path / "model"
  model_io.save_model(str(model_dir), cfg, params)
  with pytest.raises(FileExistsError, match="already holds a saved model"):
    model_io.save_model(str(model_dir), cfg, params)
  os.remove(model_dir / "config.json")  # What a crash between the two writes leaves.
  (model_dir / "params.orbax-checkpoint-tmp-3").mkdir()  # And a torn Orbax save beside it.
  with pytest.raises(FileExistsError, match=r"parameters without config.json .*'params'"):
    model_io.save_model(str(model_dir), cfg, params)
  new = {"unet": {"w": np.ones((2, 3), np.float32)}}
  model_io.save_model(str(model_dir), cfg, new, replace_incomplete=True)
  assert sorted(os.listdir(model_dir)) == ["config.json", "params"]
  restored = model_io.ocp.StandardCheckpointer().restore(str(model_dir / "params"))
  np.testing.assert_array_equal(restored["unet"]["w"], new["unet"]["w"])


# -- SIGTERM during an evaluation phase ----------------------------------------------------------


def test_sigterm_during_evaluation_saves_within_a_batch(tmp_path, monkeypatch):
  cfg = shapes_ldm_text.get_config("tiny")
  cfg.train.num_steps = 100
  cfg.checkpoint.every = 1000
  cfg.eval.every_steps = 2
  cfg.eval.num_samples = 10000  # A phase far longer than any grace period.
  cfg.eval.batch_size = 4
  cfg.eval.reference = ""

  def fake_extractor(images, outputs=("pool",)):
    pool = np.stack([np.full(8, float(np.mean(im))) for im in images])  # Consumes every image.
    return {"pool": pool, "logits_unbiased": pool}

  generated = []

  def slow_generate(model, settings, show_progress=True, mesh=None):
    del model, show_progress
    for i in range(settings.num_samples):
      if i == 5:  # The scheduler's SIGTERM arrives mid-phase (a second batch is under way).
        os.kill(os.getpid(), signal.SIGTERM)
      generated.append(i)
      yield np.full((4, 4, 3), i % 255, np.uint8)

  monkeypatch.setattr(image_sets, "load_extractor", lambda *a, **k: fake_extractor)
  monkeypatch.setattr(sample_eval, "generate", slow_generate)
  run_eval = eval_hook.make_train_hook(cfg, str(tmp_path))
  model = ml_collections.ConfigDict({"is_text": False})
  evaluated = []

  def on_eval(state, step, check):
    evaluated.append(step)
    return run_eval(model, step, check)

  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=cfg.checkpoint.every)
  state, last = loop.run_loop(
      workdir=str(tmp_path), config=cfg, state=_state(),
      start_step=0, train_step=_STEP, next_batch=lambda: toy.make_batch(0), loader=object(),
      checkpointer=ckpt, on_eval=on_eval)
  ckpt.close()
  assert evaluated == [2] and last["step"] == 2 and int(state.step) == 2
  assert len(generated) <= 6  # Stopped at the next image after the signal, not 10000 later.
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True) as reader:
    assert reader.all_steps() == [2]  # Saved at the step being evaluated, off the schedule.
  assert not (tmp_path / "eval").exists()  # No result for the abandoned evaluation.
  assert not any(k.startswith("eval/") for k in last)


def test_eval_hook_without_signal_runs_to_the_end(tmp_path, monkeypatch):
  # The control: the same hook and check, no signal, evaluates every sample.
  cfg = shapes_ldm_text.get_config("tiny")
  cfg.eval.every_steps = 1
  cfg.eval.num_samples = 12
  cfg.eval.reference = ""
  cfg.eval.is_splits = 2
  seen = []

  def fake_extractor(images, outputs=("pool",)):
    images = list(images)
    seen.extend(images)
    logits = np.stack([np.linspace(0, 1 + i, 8) for i in range(len(images))])
    return {"pool": logits, "logits_unbiased": logits}

  def generate(model, settings, show_progress=True, mesh=None):
    for i in range(settings.num_samples):
      yield np.full((4, 4, 3), i, np.uint8)

  monkeypatch.setattr(image_sets, "load_extractor", lambda *a, **k: fake_extractor)
  monkeypatch.setattr(sample_eval, "generate", generate)
  run_eval = eval_hook.make_train_hook(cfg, str(tmp_path))
  checks = []
  metrics = run_eval(ml_collections.ConfigDict({"is_text": False}), 3, lambda: checks.append(1))
  assert len(seen) == 12 and len(checks) == 12
  assert metrics["eval/inception_score"] > 1.0
  assert (tmp_path / "eval" / "step_0000003.json").is_file()
