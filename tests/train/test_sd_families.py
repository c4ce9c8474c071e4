"""The Stable Diffusion 2 family's configs train and sample: 512-base and 768-v text-to-image,
inpainting, depth-to-image and the x4 upscaler.

Each tiny variant trains 2 steps through train.py's entry point on the shapes data (its first stage
a tiny autoencoder trained here), then samples through LatentDiffusion with its own inputs. The
training inputs of the three concat kinds are checked against what the models' own conditioning
functions make of the same images (the functions the diffusers parity tests cover).
"""

import importlib

import jax
import numpy as np
import pytest

from ldm_jax import ldm
from ldm_jax import sampling
from ldm_jax.data import shapes
from ldm_jax.data import transforms
from ldm_jax.cli import train as entry
from ldm_jax.train import ldm_task

FAMILIES = {  # name -> (config module, variant, first stage)
    "sd2_base": ("sd_v2_finetune", "base_tiny", "kl_f8"),
    "sd2_v": ("sd_v2_finetune", "tiny", "kl_f8"),
    "sd2_inpainting": ("sd_v2_inpainting", "tiny", "kl_f8"),
    "sd2_depth": ("sd_v2_depth", "tiny", "kl_f8"),
    "sd_x4_upscaler": ("sd_x4_upscaler", "tiny", "kl_f4"),
}


def tiny(module: str, variant: str):
  cfg = importlib.import_module(f"configs.{module}").get_config(variant)
  cfg.mesh.num_devices = 1
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """name -> (config, trained LatentDiffusion), every family trained 2 steps."""
  root = tmp_path_factory.mktemp("sd_families")
  first_stages = {}
  for name in ("kl_f8", "kl_f4"):
    first_stages[name] = str(root / name)
    entry.train(tiny(name, "tiny"), first_stages[name])
  out = {}
  for name, (module, variant, first_stage) in FAMILIES.items():
    cfg = tiny(module, variant)
    cfg.first_stage_checkpoint = first_stages[first_stage]
    summary = entry.train(cfg, str(root / name))
    assert summary["step"] == cfg.train.num_steps and np.isfinite(summary["loss"])
    out[name] = (cfg, ldm.LatentDiffusion.from_checkpoint(str(root / name)))
  return out


def shapes_batch(cfg, n=2):
  records = [shapes.render_shapes(0, i, size=cfg.data.image_size) for i in range(n)]
  return {"image": np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0,
          "caption": [r["caption"] for r in records],
          "boxes": [r["boxes"] for r in records],
          "box_labels": [r["box_labels"] for r in records]}


def test_text_to_image_variants(trained):
  for name, parameterization in (("sd2_base", "eps"), ("sd2_v", "v")):
    cfg, model = trained[name]
    assert model.config.diffusion.parameterization == parameterization
    prompts = ["a red circle at the center", "a blue square at the top left"]
    out = sampling.sample(model, prompts=prompts, steps=2, guidance=2.0, seed=0)
    assert out.shape == (2, 64, 64, 3) and np.all(np.isfinite(out))
    assert np.abs(out[0] - out[1]).mean() > 1e-3  # The prompt (and seed) change the sample.


def test_inpainting_trains_on_holes_and_keeps_the_known_region(trained):
  cfg, model = trained["sd2_inpainting"]
  assert model.is_text_inpainting
  batch = shapes_batch(cfg)
  extra = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))
  keep = extra["inpaint_mask"]
  assert 0 < keep.mean() < 1  # Random holes: some pixels kept, some repainted.
  np.testing.assert_array_equal(extra["masked_image"], batch["image"] * keep)
  # The step's concat is the model's own: [hole mask, masked-image latents] in concat_keys order.
  encoded = ldm_task.encode_batch(model, batch, jax.random.key(0), cfg)
  assert encoded["concat"].shape == (2, 8, 8, 1 + model.latent_channels)
  # Sampling: the known region is the input's.
  out = sampling.sample(model, prompts=batch["caption"], init_image=batch["image"], mask=keep,
                        steps=2, guidance=2.0, seed=0)
  np.testing.assert_allclose(out * keep, batch["image"] * keep, atol=1e-6)
  assert np.abs((out - batch["image"]) * (1 - keep)).max() > 1e-3


def test_depth_model_trains_on_shapes_depth_and_follows_the_map(trained):
  cfg, model = trained["sd2_depth"]
  assert model.is_depth
  batch = shapes_batch(cfg)
  concat = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))["concat"]
  ink = (batch["image"] < 0.9).any(-1).astype(np.float32)  # Objects near, background far.
  np.testing.assert_allclose(concat, model.depth_condition(ink, 8, 8), atol=1e-6)
  assert concat.shape == (2, 8, 8, 1) and concat.min() == -1.0 and concat.max() == pytest.approx(1, 1e-2)
  with pytest.raises(ValueError, match="no 'depth'"):
    ldm_task.task_inputs(model, {"image": batch["image"]}, cfg, np.random.default_rng(0))
  prompts = batch["caption"][:1] * 2
  flat = np.zeros((2, 64, 64), np.float32)
  flat[:, :, 32:] = 1.0
  a = sampling.sample(model, prompts=prompts, depth_map=ink, steps=2, seed=0)
  b = sampling.sample(model, prompts=prompts, depth_map=flat, steps=2, seed=0)
  assert a.shape == (2, 64, 64, 3)
  assert np.abs(a - b).mean() > 1e-4  # The depth map is an input of the model.


def test_upscaler_trains_on_noised_lowres_and_upscales_x4(trained):
  cfg, model = trained["sd_x4_upscaler"]
  assert model.is_upscaler and model.downsample_factor == 4
  batch = shapes_batch(cfg, n=32)
  extra = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))
  levels, concat = extra["noise_level"], extra["concat"]
  assert levels.dtype == np.int32 and levels.min() >= 0 and levels.max() < model.max_noise_level
  assert len(np.unique(levels)) > 16  # Drawn per sample.
  # concat = sqrt(a_n) x + sqrt(1 - a_n) noise, x the bicubic quarter-size image: the residual
  # over sqrt(1 - a_n) is unit Gaussian noise, unrelated to x, for each sample's own level n.
  clean = np.stack([transforms.to_float(transforms.bicubic_down(transforms.to_uint8(im), 4))
                    for im in batch["image"]])  # [B, 16, 16, 3]
  a = np.asarray(model.low_scale_schedule.alphas_cumprod, np.float64)[levels][:, None, None, None]
  noise = (concat - np.sqrt(a) * clean) / np.sqrt(1.0 - a)
  some_noise = levels >= 10
  np.testing.assert_allclose(noise[some_noise].std(axis=(1, 2, 3)), 1.0, atol=0.15)
  assert abs(np.corrcoef(noise[some_noise].ravel(), clean[some_noise].ravel())[0, 1]) < 0.05
  # The step conditions on the level as the UNet's class label.
  encoded = ldm_task.encode_batch(model, batch, jax.random.key(0), cfg)
  assert encoded["noise_level"].shape == (32,) and encoded["concat"].shape == (32, 16, 16, 3)
  out = sampling.sample(model, prompts=batch["caption"][:2], images=clean[:2], noise_level=20,
                        steps=2, seed=0)
  assert out.shape == (2, 64, 64, 3) and np.all(np.isfinite(out))
