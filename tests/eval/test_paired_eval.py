"""`evaluate.py paired`: concat-conditioned models scored against the images their conditions came
from, with metrics checked against independent computations, an oracle that must score perfectly,
and user mistakes refused in one line.

The models are the tiny super-resolution and inpainting configs with random weights (the numbers
mean nothing as quality, but every path is the real one); LPIPS has random weights too, and the
Inception is replaced by a small feature function where only the FID / IS plumbing is tested.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg, special
from skimage.metrics import structural_similarity

from configs import inpainting_vq4, semantic_synthesis, sr_openimages_x4
from ldm_jax import ldm as ldm_lib
from ldm_jax import networks
from ldm_jax.cli import evaluate
from ldm_jax.convert import lpips as lpips_convert
from ldm_jax.data import shapes, transforms
from ldm_jax.errors import InputError
from ldm_jax.eval import fid, inception_score, paired_eval, sample_eval
from ldm_jax.models import lpips as lpips_lib

SIZE = 64  # The tiny SR / inpainting models' image size (16 px latents, f = 4).
FAST = ["--num_devices", "1", "--no_progress"]


def _lpips_params(rng):
  """Random LPIPS weights: He-scaled convolutions, small non-negative heads (as trained ones are)."""
  def leaf(path, s):
    if path[-1].key == "kernel" and path[0].key.startswith("lin"):
      return rng.uniform(0, 0.1, s.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, lpips_lib.lpips_template())


def _features(images, outputs):
  """An Inception stand-in: 3 'pool' features (the channel means) and 5 'logits'."""
  x = np.asarray(images, np.float64) / 255.0  # [N, H, W, 3]
  pool = x.mean((1, 2))  # [N, 3]
  logits = 8.0 * np.concatenate([pool, pool[:, :2] * pool[:, 1:]], -1)  # [N, 5]
  out = {"pool": pool, "logits_unbiased": logits}
  return {k: out[k] for k in outputs}


def _random_model(config) -> ldm_lib.LatentDiffusion:
  """A model of `config` with random weights drawn on the host: variance-preserving kernels, zero
  biases, unit norms. (Initialising through the networks compiles them: many seconds each.)"""
  template = jax.eval_shape(lambda k: networks.init_params(config, k), jax.random.key(0))
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(1.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if name == "scale":
      return np.ones(s.shape, np.float32)
    if name == "embedding":
      return rng.normal(0, 1.0, s.shape).astype(np.float32)
    return np.zeros(s.shape, np.float32)
  return ldm_lib.LatentDiffusion(config, jax.tree_util.tree_map_with_path(leaf, template))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Tiny SR, inpainting and unconditional models (in memory and saved), an LPIPS file and a
  folder of 5 ground-truth images."""
  root = tmp_path_factory.mktemp("paired")
  paths = {"root": root, "models": {}}
  uncond = sr_openimages_x4.get_config("tiny").model  # The SR network without its condition.
  uncond.cond_stage = {"kind": "none"}
  uncond.diffusion.conditioning_key = None
  uncond.unet.in_channels = sr_openimages_x4.LATENT_CHANNELS
  for name, config in (("sr", sr_openimages_x4.get_config("tiny").model),
                       ("inpaint", inpainting_vq4.get_config("tiny").model), ("uncond", uncond)):
    model = _random_model(config)
    paths[name] = str(root / name)
    model.save(paths[name])
    paths["models"][name] = model
  lpips_params = _lpips_params(np.random.default_rng(0))
  paths["lpips_params"] = lpips_params
  paths["lpips"] = str(root / "lpips.npz")
  lpips_convert.save_lpips_params(lpips_params, paths["lpips"])
  truth = root / "truth"
  truth.mkdir()
  for i in range(5):
    Image.fromarray(shapes.render_shapes(3, i, size=SIZE)["image"]).save(truth / f"{i:03d}.png")
  paths["truth"] = str(truth)
  return paths


def _truth(assets, n):
  return np.stack([np.asarray(Image.open(os.path.join(assets["truth"], f"{i:03d}.png")))
                   for i in range(n)])


def _saved(folder, n):
  return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in range(n)])


def _psnr(a, b):
  """The closed form, in float64: 10 log10(255^2 / MSE)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10.0 * np.log10(255.0 ** 2 / mse)


def _ssim(a, b):
  return structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False)


def _check_per_image(metrics, truth, out, lpips_params=None):
  for name, values in (("psnr", [_psnr(a, b) for a, b in zip(truth, out)]),
                       ("ssim", [_ssim(a, b) for a, b in zip(truth, out)])):
    np.testing.assert_allclose(metrics[name], np.mean(values), rtol=0, atol=2e-4, err_msg=name)
    np.testing.assert_allclose(metrics[name + "_std"], np.std(values), rtol=0, atol=2e-4,
                               err_msg=name)
  if lpips_params is None:
    assert "lpips" not in metrics
    return
  # The network as its module defines it (jitted here only to compile it whole, once).
  want = np.asarray(jax.jit(lpips_lib.lpips_fn(lpips_params))(transforms.to_float(truth),
                                                              transforms.to_float(out)))
  np.testing.assert_allclose(metrics["lpips"], want.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["lpips_std"], want.std(), rtol=1e-4, atol=1e-7)


def test_metrics_equal_independent_computations(assets):
  truth = _truth(assets, 4)
  rng = np.random.default_rng(1)
  out = np.clip(truth + rng.normal(0, 20, truth.shape) + 30 * (np.arange(4) % 2)[:, None, None,
                                                                                 None],
                0, 255).astype(np.uint8)
  batches = [(truth[:2], out[:2]), (truth[2:], out[2:])]  # One shape: one compilation.
  m = paired_eval.paired_metrics(batches, extractor=_features,
                                 lpips_params=assets["lpips_params"], is_splits=1)
  assert m["num_images"] == 4
  _check_per_image(m, truth, out, assets["lpips_params"])
  # FID of the outputs against the ground truth, by scipy's sqrtm; IS of the outputs alone.
  f_out, f_truth = _features(out, ("pool",))["pool"], _features(truth, ("pool",))["pool"]
  mu1, mu2 = f_out.mean(0), f_truth.mean(0)
  s1, s2 = np.cov(f_out, rowvar=False), np.cov(f_truth, rowvar=False)
  want_fid = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
  np.testing.assert_allclose(m["fid"], want_fid, rtol=1e-4, atol=1e-9)
  p = special.softmax(_features(out, ("logits_unbiased",))["logits_unbiased"], axis=1)
  want_is = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
  np.testing.assert_allclose(m["inception_score"], want_is, rtol=1e-9)


def test_oracle_scores_perfectly(assets):
  """Outputs that are the ground truth: PSNR +inf, SSIM 1, LPIPS 0, FID 0."""
  truth = _truth(assets, 4)
  m = paired_eval.paired_metrics([(truth, truth)], extractor=_features,
                                 lpips_params=assets["lpips_params"], is_splits=1)
  assert m["psnr"] == math.inf
  np.testing.assert_allclose(m["ssim"], 1.0, atol=1e-6)
  np.testing.assert_allclose(m["lpips"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["fid"], 0.0, atol=1e-6)


def _capture_inputs(assets, name, settings, count=3):
  """(truth, the sampler inputs of every example) through `pairs`, the sampler an oracle."""
  from ldm_jax.data.folder import ImageFolderSource
  model = assets["models"][name]
  seen = []

  def oracle(truth, seeds, **inputs):
    seen.append(dict(inputs, seeds=seeds))
    return truth

  source = ImageFolderSource(assets["truth"], verify=False)
  got = list(paired_eval.pairs(model, source, count, settings, outputs_fn=oracle,
                               show_progress=False))
  for truth, out in got:
    np.testing.assert_array_equal(truth, out)  # The oracle's outputs come back as uint8 truth.
  return np.concatenate([t for t, _ in got]), seen


def test_conditions_are_made_from_the_ground_truth(assets):
  """SR: the truth bicubic-downsampled by the first stage's factor (BSR: another, reproducible
  view); inpainting: the truth and a mask drawn for the example's index alone."""
  s = paired_eval.PairedSettings(batch_size=2, seed=7)
  truth, seen = _capture_inputs(assets, "sr", s)
  low = np.concatenate([x["images"] for x in seen])[:3]
  want = np.stack([transforms.to_float(transforms.bicubic_down(t, 4)) for t in truth])
  np.testing.assert_array_equal(low, want)  # [3, 16, 16, 3]
  assert [x["seeds"] for x in seen] == [[7, 8], [9, 9]]  # The last batch filled with a copy.
  bsr = paired_eval.PairedSettings(batch_size=2, degradation="bsr")
  _, seen_bsr = _capture_inputs(assets, "sr", bsr)
  low_bsr = np.concatenate([x["images"] for x in seen_bsr])[:3]
  assert low_bsr.shape == low.shape and np.abs(low_bsr - low).mean() > 0.01
  np.testing.assert_array_equal(np.concatenate([x["images"] for x in
                                                _capture_inputs(assets, "sr", bsr)[1]])[:3],
                                low_bsr)
  truth, seen = _capture_inputs(assets, "inpaint", s)
  init = np.concatenate([x["init_image"] for x in seen])[:3]
  masks = np.concatenate([x["mask"] for x in seen])[:3]
  np.testing.assert_array_equal(init, transforms.to_float(truth))
  assert masks.shape == (3, SIZE, SIZE, 1) and 0 < masks.mean() < 1
  assert not np.array_equal(masks[0], masks[1])
  np.testing.assert_array_equal(masks[2], paired_eval.inpaint_mask(SIZE, "box", 2))


@pytest.mark.parametrize("name, task", [("sr", "super_resolution"), ("inpaint", "inpainting")])
def test_cli_scores_sampled_outputs(assets, capsys, monkeypatch, name, task):
  """Sampled end to end: the JSON's metrics are those of the saved outputs against the images."""
  out_json = str(assets["root"] / f"{name}.json")
  saved = str(assets["root"] / f"{name}_samples")
  # Each optional metric's wiring once: LPIPS and FID / IS (the Inception stand-in) for SR.
  extra = ["--lpips", assets["lpips"], "--inception", "stand-in"] if name == "sr" else []
  monkeypatch.setattr(evaluate, "_extractor", lambda args: _features)
  batch = "3" if name == "sr" else "2"  # Inpainting: the last batch filled up and cut.
  rc = evaluate.main(["paired", "--checkpoint", assets[name], "--data", assets["truth"],
                      "--num_images", "3", "--batch_size", batch, "--steps", "2",
                      "--save_samples", saved, "--out", out_json] + extra + FAST)
  assert rc == 0, capsys.readouterr().err
  with open(out_json) as f:
    result = json.load(f)
  m = result["metrics"]
  assert result["mode"] == "paired" and m["task"] == task and m["num_images"] == 3
  assert result["settings"]["steps"] == 2
  truth, out = _truth(assets, 3), _saved(saved, 3)
  _check_per_image(m, truth, out, assets["lpips_params"] if extra else None)
  assert m["psnr"] < 40  # Random weights do not reproduce the images.
  if extra:  # FID of the outputs against the ground truth, IS of the outputs (3 splits of 1).
    want = fid.frechet_distance(*fid.feature_statistics(_features(out, ("pool",))["pool"]),
                                *fid.feature_statistics(_features(truth, ("pool",))["pool"]))
    np.testing.assert_allclose(m["fid"], want, rtol=1e-6, atol=1e-9)
    logits = _features(out, ("logits_unbiased",))["logits_unbiased"]
    want_is = inception_score.inception_score(logits, splits=3)
    np.testing.assert_allclose((m["inception_score"], m["inception_score_std"]), want_is)
  else:
    assert "fid" not in m and "inception_score" not in m  # No --inception: no FID / IS.
  if name == "inpaint":  # The known pixels are pasted back: exact there, not everywhere.
    keep = np.stack([paired_eval.inpaint_mask(SIZE, "box", i) for i in range(3)]) == 1.0
    keep = np.broadcast_to(keep, truth.shape)
    np.testing.assert_array_equal(out[keep], truth[keep])
    assert not np.array_equal(out, truth)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{uncond}", "--data", "{truth}"],
     "paired evaluation needs a model conditioned on an image made from the ground truth"),
    (["--checkpoint", "{sr}", "--data", "/no/such/dir"],
     "--data=/no/such/dir: expected an existing image folder"),
    (["--checkpoint", "{sr}", "--data", "{truth}", "--steps", "1001"],
     "--steps=1001: expected 1 <= steps <= 1000"),
    (["--checkpoint", "/no/such/model", "--data", "{truth}", "--steps", "0"],
     "--steps=0: expected >= 1"),  # Checked before the model is loaded: T is not known yet.
    (["--checkpoint", "/no/such/model", "--data", "{truth}", "--eta", "0.5", "--sampler", "plms"],
     "--eta=0.5 with --sampler=plms: eta is a DDIM setting"),
    (["--checkpoint", "{sr}", "--data", "{truth}", "--num_images", "1", "--inception", "x.npz"],
     "--data={truth}: 1 image(s) (--num_images=1); expected at least 2 for FID"),
    (["--checkpoint", "{sr}", "--data", "{truth}", "--image_size", "36"],
     "--image_size=36: expected a multiple of 8"),
])
def test_cli_user_errors(assets, capsys, tmp_path, argv, message):
  fill = {k: v for k, v in assets.items() if isinstance(v, str)}
  argv, message = [a.format(**fill) for a in argv], message.format(**fill)
  out = tmp_path / "r.json"
  rc = evaluate.main(["paired"] + argv + ["--out", str(out)] + FAST)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("evaluate.py: error: ") and "\n" not in err, err
  assert message in err, err
  assert not out.exists()


def test_samples_mode_points_concat_models_to_paired(assets):
  model = assets["models"]["sr"]
  with pytest.raises(InputError, match="against ground truth with `paired`"):
    sample_eval.check_settings(sample_eval.SampleSettings(), model)


def test_semantic_maps_become_one_hot_conditions():
  """A semantic model is conditioned on each record's segmentation map, one-hot over its classes;
  a record without a map or with a class the model does not know is refused by example."""
  model = _random_model(semantic_synthesis.get_config("tiny").model)
  classes = semantic_synthesis.SHAPES_SEG_CLASSES
  rng = np.random.default_rng(0)
  records = [{"image": np.full((SIZE, SIZE, 3), 9 * i, np.uint8),
              "segmentation": rng.integers(0, classes, (SIZE, SIZE))} for i in range(3)]
  seen = []

  def oracle(truth, seeds, **inputs):
    seen.append(inputs)
    return truth

  s = paired_eval.PairedSettings(batch_size=3)
  list(paired_eval.pairs(model, records, 3, s, outputs_fn=oracle, show_progress=False))
  assert paired_eval.paired_task(model) == "semantic"
  maps = seen[0]["images"]  # [3, SIZE, SIZE, classes]
  assert maps.shape == (3, SIZE, SIZE, classes) and np.all(maps.sum(-1) == 1)
  np.testing.assert_array_equal(maps.argmax(-1), np.stack([r["segmentation"] for r in records]))
  with pytest.raises(InputError, match="example 1 of the data has none"):
    list(paired_eval.pairs(model, [records[0], {"image": records[1]["image"]}], 2, s,
                           outputs_fn=oracle, show_progress=False))
  bad = dict(records[0], segmentation=np.full((SIZE, SIZE), classes))
  with pytest.raises(InputError, match=rf"example 0: .* expected \[H, W\] class indices in "
                                       rf"\[0, {classes}\)"):
    list(paired_eval.pairs(model, [bad], 1, s, outputs_fn=oracle, show_progress=False))


def test_cli_reads_a_semantic_models_maps_from_the_data_folder(assets, monkeypatch, tmp_path):
  """`paired --data FOLDER` for a semantic model opens the folder with its maps/ PNGs: each record
  handed to the evaluation carries its own map (class indices), as the condition is built from."""
  model = _random_model(semantic_synthesis.get_config("tiny").model)
  model_dir = str(tmp_path / "semantic")
  model.save(model_dir)
  classes = semantic_synthesis.SHAPES_SEG_CLASSES
  data = tmp_path / "data"
  (data / "maps").mkdir(parents=True)
  rng = np.random.default_rng(1)
  maps = {}
  for i in range(2):
    Image.fromarray(shapes.render_shapes(3, i, size=SIZE)["image"]).save(data / f"{i:03d}.png")
    maps[i] = rng.integers(0, classes, (SIZE, SIZE)).astype(np.uint8)
    Image.fromarray(maps[i]).save(data / "maps" / f"{i:03d}.png")
  seen = {}

  def capture(model, source, count, settings, **kwargs):
    seen["records"] = [source[i] for i in range(count)]
    return {"task": "semantic"}

  monkeypatch.setattr(paired_eval, "evaluate_paired", capture)
  rc = evaluate.main(["paired", "--checkpoint", model_dir, "--data", str(data), "--steps", "2",
                      "--out", str(tmp_path / "r.json")] + FAST)
  assert rc == 0
  assert len(seen["records"]) == 2
  for i, record in enumerate(seen["records"]):
    np.testing.assert_array_equal(record["segmentation"], maps[i])
