"""The noisy-latent classifier's training task, and sample.py guiding with what it trained.

  * The objective against a numpy closed form: cross-entropy (with and without label smoothing)
    and accuracy of the logits of q_sample(z0, t, noise), for a fixed batch, t and noise.
  * t is drawn uniformly over every training timestep [0, T), as CompVis draws it.
  * Two steps through train.py's entry point on the tiny config: loss and accuracy logged every
    step, the classifier's parameters moved by the step, classifier.json written.
  * sample.py --classifier with that workdir: guided samples are written; a classifier whose
    classes, latent shape or schedule do not fit the model is refused with one line and exit 2.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import classifier_util
import cli_util
from configs import shapes_classifier
from ldm_jax import ldm as ldm_lib
from ldm_jax import validate
from ldm_jax import workdir_layout as layout
from ldm_jax import model_io
from ldm_jax.cli import train as entry
from ldm_jax.diffusion.schedules import Schedule, make_betas
from ldm_jax.errors import ConfigError
from ldm_jax.train import classifier_task
from ldm_jax.train import loop

SCHEDULE = Schedule.create("linear", 1000, 0.0015, 0.0155)


def _linear_logits(params, x, t):
  w, b = params
  return x.reshape(x.shape[0], -1) @ w + b + 0.001 * t[:, None].astype(jnp.float32)  # [B, K]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_matches_numpy_closed_form(smoothing):
  rng = np.random.default_rng(0)
  b, k, shape = 4, 5, (4, 2, 2, 3)
  z0, noise = rng.standard_normal(shape), rng.standard_normal(shape)
  w, bias = rng.standard_normal((12, k)), rng.standard_normal(k)
  t, labels = np.array([0, 10, 500, 999]), np.array([1, 4, 0, 2])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  loss, metrics = classifier_task.noisy_classifier_loss(
      _linear_logits, (f32(w), f32(bias)), f32(z0), jnp.asarray(labels), jnp.asarray(t),
      f32(noise), SCHEDULE, label_smoothing=smoothing)

  # float64 reference, schedule from the betas.
  a = np.cumprod(1.0 - make_betas("linear", 1000, 0.0015, 0.0155))[t][:, None, None, None]
  x_t = np.sqrt(a) * z0 + np.sqrt(1.0 - a) * noise
  logits = x_t.reshape(b, -1) @ w + bias + 0.001 * t[:, None]
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  target = np.eye(k)[labels] * (1.0 - smoothing) + smoothing / k
  want = -(target * log_p).sum(-1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics["accuracy"]) == np.mean(logits.argmax(-1) == labels)
  # The noise matters: the loss on clean latents is another number.
  clean = classifier_task.noisy_classifier_loss(
      _linear_logits, (f32(w), f32(bias)), f32(z0), jnp.asarray(labels), jnp.asarray(t),
      jnp.zeros(shape), SCHEDULE, label_smoothing=smoothing)[0]
  assert abs(float(clean) - want) > 1e-3


def test_timesteps_cover_every_training_step_uniformly():
  t, noise = classifier_task.draw_t_and_noise(jax.random.PRNGKey(0), (4000, 1, 1, 1), 10)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert t.dtype == jnp.int32 and len(counts) == 10  # nothing at T or beyond
  assert counts.min() > 300, counts  # 400 expected per step: 0 and T - 1 included
  assert abs(float(noise.std()) - 1.0) < 0.05


def test_config_refuses_a_classifier_that_cannot_read_the_latents():
  c = shapes_classifier.get_config("tiny")
  validate.check_config(c)
  c.model.classifier.in_channels = 3
  with pytest.raises(ConfigError, match=r"config.model.classifier.in_channels=3.*embed_dim=4"):
    validate.check_config(c)
  c = shapes_classifier.get_config("tiny")
  c.model.classifier.image_size = 16
  with pytest.raises(ConfigError, match=r"classifier.image_size=16.*expected 8"):
    validate.check_config(c)
  c = shapes_classifier.get_config("tiny")
  c.data.label_key = ""
  with pytest.raises(ConfigError, match=r"config.data.label_key=''"):
    validate.check_config(c)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(LDM dir, classifier workdir, config): the tiny classifier trained 2 steps on a tiny LDM."""
  root = tmp_path_factory.mktemp("classifier")
  ldm_dir, workdir = str(root / "ldm"), str(root / "clf")
  classifier_util.uncond_model().save(ldm_dir)
  c = shapes_classifier.get_config("tiny")
  c.diffusion_checkpoint = ldm_dir
  c.mesh.num_devices = 1
  c.checkpoint.every = 1  # Steps 1 and 2 both kept: the test compares their parameters.
  entry.train(c, workdir)
  return ldm_dir, workdir, c


def test_two_steps_log_loss_and_accuracy_and_move_the_params(trained):
  ldm_dir, workdir, c = trained
  metrics = loop.read_metrics(workdir)
  assert sorted(metrics) == [1, 2]
  for row in metrics.values():
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    assert 0.0 <= row["accuracy"] <= 1.0
  # The parameters after step 1 and after step 2, as saved.
  first, second = (_checkpoint_params(workdir, step) for step in (1, 2))
  assert jax.tree.structure(first) == jax.tree.structure(second)
  moved = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second))]
  assert np.mean(moved) > 0.9, f"{sum(moved)} of {len(moved)} leaves moved"
  # What sampling reads is the newest step's.
  newest = model_io.restore_trained_params(workdir)
  for x, y in zip(jax.tree.leaves(newest), jax.tree.leaves(second)):
    np.testing.assert_array_equal(x, y)
  with open(layout.classifier_path(workdir)) as f:
    info = json.load(f)
  assert info["kwargs"]["num_classes"] == 18 and info["latent"]["channels"] == 4
  assert info["latent"]["schedule"]["timesteps"] == 1000


def test_the_task_keeps_only_the_first_stage_of_the_diffusion_model(trained, tmp_path):
  """The classifier encodes its batches with the diffusion model's first stage and reads its
  schedule; the UNet's parameters are not held beside the classifier's (what `python -m ldm_jax.aot`
  counts as resident is the first stage alone)."""
  ldm_dir, _, c = trained
  task = classifier_task.ClassifierTask(c, str(tmp_path))
  task.build(None, {"label": np.zeros((2,), np.int32)})
  assert set(task.model.params) == {"first_stage"}
  full = ldm_lib.LatentDiffusion.from_checkpoint(ldm_dir)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(task.model.encode(images), full.encode(images))
  np.testing.assert_array_equal(task.model.schedule.alphas_cumprod, full.schedule.alphas_cumprod)


def _checkpoint_params(workdir, step):
  state_dir = os.path.join(layout.checkpoints_dir(workdir), str(step), layout.STATE_ITEM)
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(os.path.abspath(state_dir))["params"])


def _sample_args(ldm_dir, clf, outdir, *extra):
  return ["--checkpoint", ldm_dir, "--classifier", clf, "--outdir", str(outdir), "--steps", "2",
          "--no_progress", *extra]


def test_sample_cli_guides_with_the_trained_classifier(trained, tmp_path, capsys):
  ldm_dir, workdir, _ = trained
  code, out, err = cli_util.run_sample(
      _sample_args(ldm_dir, workdir, tmp_path, "--class_label", "3", "--class_label", "17",
                   "--classifier_scale", "4"), capsys)
  assert code == 0, err
  with open(tmp_path / "samples.json") as f:
    record = json.load(f)
  assert [s["label"] for s in record["samples"]] == [3, 17]
  assert record["settings"]["classifier"] == workdir
  assert record["settings"]["classifier_scale"] == 4.0


@pytest.mark.parametrize("case,extra,message", [
    ("label", ["--class_label", "18"], r"class label 18 .*expected 0 <= label < 18"),
    ("sampler", ["--class_label", "1", "--sampler", "dpmpp_2m"],
     r"'dpmpp_2m'.*classifier guidance runs with ddim, plms, ddpm"),
    ("no label", [], r"--classifier needs --class_label"),
    ("channels", ["--class_label", "1"], r"reads 3-channel latents; this model's have 4"),
    ("schedule", ["--class_label", "1"], r"trained with diffusion.linear_end=0.03; this model"),
])
def test_sample_cli_refuses_a_classifier_that_does_not_fit(trained, tmp_path, capsys, case,
                                                           extra, message):
  ldm_dir, workdir, _ = trained
  clf = workdir
  if case in ("channels", "schedule"):  # A copy of the workdir whose description differs.
    clf = str(tmp_path / "clf")
    os.makedirs(clf)
    os.symlink(layout.checkpoints_dir(workdir), layout.checkpoints_dir(clf))
    with open(layout.classifier_path(workdir)) as f:
      info = json.load(f)
    if case == "channels":
      info["kwargs"]["in_channels"] = 3
    else:
      info["latent"]["schedule"]["linear_end"] = 0.03
    with open(layout.classifier_path(clf), "w") as f:
      json.dump(info, f)
  code, _, err = cli_util.run_sample(_sample_args(ldm_dir, clf, tmp_path / "out", *extra), capsys)
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1, err
  assert re.search(message, err), err
  assert not os.path.exists(tmp_path / "out" / "grid.png")
