"""evaluate.py end to end on the tiny shapes models, with a RANDOM-weight FID Inception and LPIPS.

Random weights make the numbers meaningless as quality measures, but every path is the real one:
the Inception and LPIPS files go through their converters' loaders, the models through checkpoints,
the reference through an image folder, a statistics file and precision/recall.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_jax.cli import evaluate
from ldm_jax.train import eval_hook
from ldm_jax.convert import inception as inception_convert
from ldm_jax.convert import lpips as lpips_convert
from ldm_jax.data import shapes
from ldm_jax.eval import inception
from ldm_jax.models import lpips as lpips_lib

PROMPT = "a red circle at the top left"
# One device and Inception batches of 4: 8 fake devices would pad every call to 8 images.
FAST = ["--num_devices", "1", "--inception_batch", "4", "--no_progress"]


def _random_tree(template, rng: np.random.Generator):
  """He-scaled kernels, non-trivial BatchNorm statistics, small biases: finite, varied features."""
  def leaf(path, s):
    name = path[-1].key
    if name == "kernel" and path[0].key.startswith("lin"):  # LPIPS heads are non-negative
      return rng.uniform(0, 0.1, s.shape).astype(np.float32)
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, template)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Random Inception + LPIPS weight files, and a reference folder of 4 shapes images (32 px).

  Few images everywhere: the Inception runs at 299 x 299 (~6 GFLOPs an image).
  """
  root = tmp_path_factory.mktemp("eval_assets")
  rng = np.random.default_rng(0)
  inception_npz = str(root / "inception.npz")
  inception_convert.save_inception_params(_random_tree(inception.inception_template(), rng),
                                          inception_npz)
  lpips_npz = str(root / "lpips.npz")
  lpips_convert.save_lpips_params(_random_tree(lpips_lib.lpips_template(), rng), lpips_npz)
  ref = root / "reference"
  ref.mkdir()
  for i in range(4):
    Image.fromarray(shapes.render_shapes(7, i, size=32)["image"]).save(ref / f"{i:03d}.png")
  return {"inception": inception_npz, "lpips": lpips_npz, "reference": str(ref), "root": root}


def _run(argv, capsys):
  rc = evaluate.main(argv)
  return rc, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def samples_run(tiny_workdirs, assets):
  """`evaluate.py samples` once: 4 samples of the tiny text LDM against the reference folder."""
  out = str(assets["root"] / "samples.json")
  sample_dir = str(assets["root"] / "samples")
  rc = evaluate.main(["samples", "--checkpoint", tiny_workdirs["ldm"], "--num_samples", "4",
                      "--steps", "2", "--batch_size", "3", "--prompt", PROMPT, "--seed", "5",
                      "--inception", assets["inception"], "--reference", assets["reference"],
                      "--pr_k", "2", "--save_samples", sample_dir, "--out", out] + FAST)
  assert rc == 0
  with open(out) as f:
    return {"result": json.load(f), "dir": sample_dir}


def test_samples_mode(samples_run):
  result = samples_run["result"]
  m = result["metrics"]
  assert result["mode"] == "samples"
  assert m["num_samples"] == 4 and m["num_reference"] == 4 and m["is_splits"] == 4
  for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
    assert np.isfinite(m[key]), key
  assert m["fid"] > 0 and m["inception_score"] >= 1.0 - 1e-9
  assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["pr_k"] == 2
  s = result["settings"]
  assert (s["steps"], s["sampler"], s["seed"], s["prompt"]) == (2, "ddim", 5, [PROMPT])
  # 4 samples from batches of 3 (the last one filled up and cut), written in order.
  assert sorted(os.listdir(samples_run["dir"])) == [f"{i:06d}.png" for i in range(4)]


def test_folder_mode_and_stats_file(samples_run, assets, capsys):
  """`stats` writes the reference's statistics; the folder against the statistics of itself gives
  FID ~0."""
  root = assets["root"]
  stats = str(root / "ref_stats.npz")
  assert _run(["stats", "--reference", assets["reference"], "--inception", assets["inception"],
               "--out", stats] + FAST, capsys)[0] == 0
  with np.load(stats) as f:
    assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    assert np.all(np.isfinite(f["sigma"])) and np.abs(f["mu"]).max() > 0
  out = str(root / "self.json")
  assert _run(["folder", "--samples", assets["reference"], "--reference", stats, "--inception",
               assets["inception"], "--out", out] + FAST, capsys)[0] == 0
  with open(out) as f:
    m = json.load(f)["metrics"]
  assert m["num_samples"] == 4 and "precision" not in m  # a stats file has no features for P/R
  assert abs(m["fid"]) < 1e-3 * samples_run["result"]["metrics"]["fid"]
  assert np.isfinite(m["inception_score"])


def test_autoencoder_mode(tiny_workdirs, assets, capsys):
  out = str(assets["root"] / "ae.json")
  rc, err = _run(["autoencoder", "--checkpoint", tiny_workdirs["ae"], "--data",
                  assets["reference"], "--num_images", "3", "--batch_size", "2", "--lpips",
                  assets["lpips"], "--inception", assets["inception"], "--out", out] + FAST,
                 capsys)
  assert rc == 0, err
  with open(out) as f:
    m = json.load(f)["metrics"]
  assert m["num_images"] == 3
  for key in ("psnr", "ssim", "lpips", "rfid"):
    assert np.isfinite(m[key]), key
  assert m["lpips"] > 0 and m["rfid"] > 0
  # PSNR / SSIM against scikit-image on reconstructions made through the module's own __call__.
  module, variables, _ = evaluate_first_stage(tiny_workdirs["ae"])
  images = np.stack([np.asarray(Image.open(os.path.join(assets["reference"], f"{i:03d}.png")))
                     for i in range(3)])
  rec, _ = module.apply(variables, images.astype(np.float32) / 127.5 - 1.0,
                        sample_posterior=False)
  rec = np.asarray(np.round((np.clip(np.asarray(rec), -1, 1) + 1) * 127.5), np.uint8)
  want_psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(images, rec)])
  want_ssim = np.mean([structural_similarity(a, b, data_range=255, channel_axis=-1,
                                             gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)
                       for a, b in zip(images, rec)])
  np.testing.assert_allclose(m["psnr"], want_psnr, atol=1e-3)
  np.testing.assert_allclose(m["ssim"], want_ssim, atol=1e-4)
  # The LDM workdir holds the same first stage: the same PSNR (no Inception or LPIPS this time).
  out2 = str(assets["root"] / "ae_from_ldm.json")
  assert _run(["autoencoder", "--checkpoint", tiny_workdirs["ldm"], "--data", assets["reference"],
               "--num_images", "3", "--batch_size", "2", "--out", out2, "--no_progress"],
              capsys)[0] == 0
  with open(out2) as f:
    m2 = json.load(f)["metrics"]
  np.testing.assert_allclose(m2["psnr"], m["psnr"], rtol=1e-6)
  assert "rfid" not in m2 and "lpips" not in m2


def evaluate_first_stage(path):
  """(module, variables, config) of a first stage, as `evaluate.py autoencoder` loads it."""
  from ldm_jax import model_io
  from ldm_jax.models import build
  cfg, variables = model_io.load_first_stage(path)
  return build.build_first_stage(cfg), variables, cfg


def test_train_hook(tiny_workdirs, assets):
  """config.eval -> make_train_hook: scalars for the metric writer and a JSON per step."""
  from configs import shapes_ldm_text
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import validate
  config = shapes_ldm_text.get_config("tiny")
  config.mesh.num_devices = 1
  # No reference: FID is covered by the tests above.
  config.eval.update(every_steps=2, num_samples=2, steps=2, batch_size=2, inception_batch=4,
                     inception=assets["inception"], reference="", pr_k=0)
  validate.check_config(config)
  run = eval_hook.make_train_hook(config, str(assets["root"] / "hook"))
  model = ldm_lib.LatentDiffusion.from_checkpoint(tiny_workdirs["ldm"])
  scalars = run(model, 7)
  assert set(scalars) == {"eval/inception_score", "eval/inception_score_std"}
  assert all(np.isfinite(v) for v in scalars.values())
  with open(assets["root"] / "hook" / "eval" / "step_0000007.json") as f:
    assert json.load(f)["metrics"]["num_samples"] == 2
  config.eval.sampler = "heun"
  with pytest.raises(ValueError, match=r"config.eval.sampler='heun': expected one of"):
    validate.check_config(config)
  config.eval.update(sampler="ddim", inception="/no/such.npz")
  with pytest.raises(ValueError, match=r"config.eval.inception='/no/such.npz'"):
    validate.check_config(config)


def test_loop_logs_eval_with_the_step(tmp_path):
  """run_loop merges on_eval's scalars into that step's logged metrics (one line per step)."""
  import jax.numpy as jnp
  from configs import common
  from ldm_jax.train import loop

  class NoCheckpoints:
    save_every = 1000

    def save(self, *args, **kwargs):
      pass

    def wait(self):
      pass

  config = common.base_config()
  config.train.num_steps = 4
  config.log.every = 3
  config.eval.every_steps = 2
  calls = []

  def on_eval(state, step, check):
    check()  # The loop's preemption check: no signal here, so it returns.
    calls.append(step)
    return {"eval/fid": 10.0 + step}

  step_fn = lambda state, batch: (state + 1, {"loss": jnp.float32(state)})
  loop.run_loop(workdir=str(tmp_path), config=config, state=jnp.int32(0), start_step=0,
                train_step=step_fn, next_batch=lambda: None, loader=None,
                checkpointer=NoCheckpoints(), on_eval=on_eval)
  logged = loop.read_metrics(str(tmp_path))
  assert calls == [2, 4]
  assert sorted(logged) == [2, 3, 4]  # step 2 is logged for its evaluation, 3 by log.every
  assert logged[2]["eval/fid"] == 12.0 and logged[4]["eval/fid"] == 14.0
  assert logged[2]["loss"] == 1.0 and "eval/fid" not in logged[3]


@pytest.mark.parametrize("argv,message", [
    (["folder", "--samples", "{ref}", "--reference", "/no/such/dir", "--inception", "{inc}"],
     "--reference=/no/such/dir: expected an existing image folder"),
    (["folder", "--samples", "{ref}", "--reference", "{ref}", "--inception", "/no/such.npz"],
     "--inception=/no/such.npz: FID Inception weights file"),
    (["folder", "--samples", "{ref}", "--reference", "{ref}"], "--inception is required"),
    (["folder", "--samples", "{ref}", "--reference", "{ref}", "--inception", "{inc}",
      "--is_splits", "0"], "--is_splits=0: expected >= 1"),
    (["folder", "--samples", "{ref}", "--reference", "{ref}", "--inception", "{inc}",
      "--max_images", "2", "--pr_k", "3"], "precision/recall with k=3 needs more than 3 samples"),
    (["samples", "--checkpoint", "{ldm}", "--inception", "{inc}", "--prompt", "x", "--reference",
      "{ref}", "--num_samples", "3"], "precision/recall with k=3 needs more than 3 samples"),
    (["folder", "--samples", "{ref}", "--reference", "{ref}", "--inception", "{inc}",
      "--max_reference", "3"], "k=3 needs more than 3 reference images (got 3)"),
    (["stats", "--reference", "{ref}", "--inception", "{inc}", "--out", "x.json"],
     "--out=x.json: expected a path ending in .npz"),
    (["samples", "--checkpoint", "/no/such/model", "--inception", "{inc}"],
     "cannot load the model"),
    (["samples", "--checkpoint", "{ldm}", "--inception", "{inc}"],
     "text-conditional model: give --prompt or --prompt_file"),
    (["samples", "--checkpoint", "{ldm}", "--inception", "{inc}", "--prompt", "x", "--steps",
      "0"], "--steps=0: expected 1 <= steps <= 1000"),
    (["samples", "--checkpoint", "{ldm}", "--inception", "{inc}", "--class_label", "1"],
     "--class_label was given, but this model is conditioned by 'ldm_bert'"),
    (["autoencoder", "--checkpoint", "{ae}", "--data", "{ref}", "--image_size", "30"],
     "--image_size=30: expected a multiple of the first stage's down-sampling factor 4"),
    (["autoencoder", "--checkpoint", "{ref}", "--data", "{ref}"], "cannot load the autoencoder"),
    (["autoencoder", "--compvis_ckpt", "{inc}", "--data", "{ref}"], "--compvis_ckpt needs"),
])
def test_user_errors(argv, message, tiny_workdirs, assets, capsys, tmp_path):
  fill = {"{ref}": assets["reference"], "{inc}": assets["inception"], "{ldm}": tiny_workdirs["ldm"],
          "{ae}": tiny_workdirs["ae"]}
  argv = [fill.get(a, a) for a in argv]
  if "--out" not in argv:
    argv += ["--out", str(tmp_path / "r.json")]
  rc, err = _run(argv + ["--no_progress", "--num_devices", "1"], capsys)
  assert rc == 2
  assert err.startswith("evaluate.py: error: ") and "\n" not in err
  assert message in err, err
