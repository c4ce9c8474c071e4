"""The Stable Diffusion x4 upscaler (LatentUpscaleDiffusion) against its torch references.

* diffusers: a tiny `StableDiffusionUpscalePipeline` (random non-zero weights, v prediction, the
  real low_res_scheduler) through `LatentDiffusion.from_diffusers`; both get the same x_T and the
  same image-space noise for the low-resolution input; 5 DDIM steps with guidance and a negative
  prompt must end at the pipeline's latents and images (1e-4 of their scale, fp32).
* CompVis: `openaimodel.UNetModel(num_classes=1000)` with 'hybrid-adm' routing and the original
  `ImageConcatWithNoiseAugmentation` noising the input, from a `.ckpt` + x4-upscaling-style YAML.
* sample.py --lowres --noise_level on the folder.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import cli_util
import tiny_sd
from assets_util import assert_close
from ldm_jax import family
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.models.tokenizers import write_clip_tokenizer_dir

TOL = 1e-4
NEGATIVE = ["blurry", "jpeg artifacts"]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("upscaler"))
  tokenizer_dir = write_clip_tokenizer_dir(os.path.join(root, "clip_tokenizer"))
  folder, pipe = tiny_sd.diffusers_upscale_folder(root, tokenizer_dir)
  return dict(root=root, tokenizer_dir=tokenizer_dir, folder=folder, pipe=pipe,
              model=ldm_lib.LatentDiffusion.from_diffusers(folder))


def _lowres(seed=3):
  return np.random.RandomState(seed).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)


def test_folder_config(built):
  d = built["model"].config.diffusion
  assert d.conditioning_key == "hybrid-adm" and d.model_target == family.UPSCALE_TARGET
  assert d.parameterization == "v" and built["model"].max_noise_level == 350
  np.testing.assert_allclose(np.asarray(built["model"].low_scale_schedule.alphas_cumprod),
                             built["pipe"].low_res_scheduler.alphas_cumprod.numpy(), rtol=1e-5)


@pytest.mark.parametrize("noise_level", [20, 300])
def test_sampling_matches_pipeline(built, monkeypatch, noise_level):
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as mod
  pipe, model = built["pipe"], built["model"]
  lowres = _lowres()
  x_T = np.random.RandomState(4).randn(2, 8, 8, 4).astype(np.float32)
  seeds = [7, 8]
  noise = np.asarray(sampling.lowres_noise(seeds, (8, 8, 3)))  # what we add to the input
  monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: _nchw(noise))
  with torch.no_grad():
    want = pipe(tiny_sd.PROMPTS, image=_nchw((lowres + 1) / 2), negative_prompt=NEGATIVE,
                num_inference_steps=5, guidance_scale=3.0, noise_level=noise_level, eta=0.0,
                latents=_nchw(x_T), output_type="latent").images
    want_img = _nhwc(pipe.vae.decode(want / 0.08333).sample)
  want = _nhwc(want)
  kwargs = dict(prompts=tiny_sd.PROMPTS, images=lowres, negative_prompt=NEGATIVE,
                noise_level=noise_level, seeds=seeds, steps=5, guidance=3.0, x_T=jnp.asarray(x_T))
  got = sampling.sample(model, decode=False, **kwargs)
  assert_close(got, want, rel=TOL, what=f"upscaler latents, noise level {noise_level}")
  assert np.abs(want - x_T).max() > 0.1
  assert_close(sampling.sample(model, **kwargs), want_img, rel=TOL, what="upscaler images")
  # The level matters (as label and as noise), and so does the input.
  other = sampling.sample(model, decode=False, **dict(kwargs, noise_level=noise_level // 2))
  assert np.abs(np.asarray(other) - want).max() > 1e-2
  other = sampling.sample(model, decode=False, **dict(kwargs, images=_lowres(9)))
  assert np.abs(np.asarray(other) - want).max() > 1e-2


def test_library_errors(built):
  model = built["model"]
  with pytest.raises(sampling.SamplingInputError, match=r"noise_level=351: expected .* \[0, 350\]"):
    sampling.sample(model, prompts=["a"], images=_lowres()[:1], noise_level=351, steps=1)
  with pytest.raises(sampling.SamplingInputError, match="for 16x32 give 8x16"):
    sampling.sample(model, prompts=["a"], images=_lowres()[:1], height=32, width=16, steps=1)


def run_cli(args, capsys):
  code, _, err = cli_util.run_sample(args, capsys)
  return code, err.strip().splitlines()


def test_cli_lowres_and_noise_level(built, tmp_path, capsys):
  model = built["model"]
  u8 = ((_lowres()[0] + 1) * 127.5).round().astype(np.uint8)
  path = str(tmp_path / "low.png")
  Image.fromarray(u8).save(path)
  common = ["--diffusers", built["folder"], "--prompt", "a cat", "--lowres", path, "--steps", "2",
            "--guidance", "2", "--seed", "5", "--no_progress"]
  outs = []
  for level in ("10", "200"):
    out = str(tmp_path / level)
    code, err = run_cli(common + ["--noise_level", level, "--outdir", out], capsys)
    assert code == 0, err
    outs.append(np.asarray(Image.open(os.path.join(out, "000000.png"))))
    settings = json.load(open(os.path.join(out, "samples.json")))["settings"]
    assert settings["noise_level"] == int(level)
  assert outs[0].shape == (16, 16, 3)  # the input's size times the first stage's factor
  want = ldm_lib.to_uint8(sampling.sample(model, prompts=["a cat"], seeds=[5], steps=2,
                                          guidance=2.0, noise_level=10,
                                          images=u8[None].astype(np.float32) / 127.5 - 1.0))
  np.testing.assert_array_equal(outs[0], want[0])
  assert np.abs(outs[0].astype(int) - outs[1]).max() > 0
  out = str(tmp_path / "bad")
  code, err = run_cli(common + ["--noise_level", "351", "--outdir", out], capsys)
  assert code == 2 and len(err) == 1 and "--noise_level=351" in err[0], err
  code, err = run_cli(["--diffusers", built["folder"], "--prompt", "a", "--steps", "1",
                       "--outdir", out], capsys)
  assert code == 2 and len(err) == 1 and "give --lowres" in err[0], err
  assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------------
# CompVis / Stability .ckpt + YAML.
# ------------------------------------------------------------------------------------------------
LOW_SCALE = dict(noise_schedule_config=dict(linear_start=0.0001, linear_end=0.02),
                 max_noise_level=350)


@pytest.fixture(scope="module")
def compvis(built):
  """A tiny x4-upscaling.yaml-style model: UNet with 7 inputs and 1000 classes, 'hybrid-adm'."""
  import yaml
  tiny_sd.stub_omegaconf()
  from assets_util import randomize_
  from ldm.modules.diffusionmodules.openaimodel import UNetModel
  from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
  root = built["root"]
  kwargs = dict(tiny_sd.UNET_KWARGS, in_channels=7, num_classes=1000)
  unet, ema = UNetModel(**kwargs).eval(), UNetModel(**kwargs).eval()
  randomize_(unet, std=tiny_sd.WEIGHT_STD, seed=31)
  randomize_(ema, std=tiny_sd.WEIGHT_STD, seed=32)
  _, first_stage, _ = tiny_sd.compvis_modules()
  text = tiny_sd.clip_text_model(seed=33)
  text_dir = os.path.join(root, "compvis_text")
  text.save_pretrained(text_dir)
  low = ImageConcatWithNoiseAugmentation(**LOW_SCALE)
  sd = tiny_sd.compvis_state_dict(unet, first_stage, ema, text)
  sd.update({"low_scale_model." + k: v for k, v in low.state_dict().items()})
  ckpt, yaml_path = tiny_sd.compvis_checkpoint(root, text_dir, sd)
  with open(yaml_path) as f:
    cfg = yaml.safe_load(f)
  params = cfg["model"]["params"]
  cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
  params.update(conditioning_key="hybrid-adm", parameterization="v", low_scale_key="lr",
                low_scale_config=dict(
                    target="ldm.modules.diffusionmodules.upscaling."
                           "ImageConcatWithNoiseAugmentation", params=LOW_SCALE))
  params["unet_config"]["params"].update(in_channels=7, num_classes=1000)
  with open(yaml_path, "w") as f:
    yaml.safe_dump(cfg, f)
  model = ldm_lib.LatentDiffusion.from_compvis(ckpt, yaml_path, use_ema=False,
                                               tokenizer_path=built["tokenizer_dir"])
  return dict(unet=unet, low=low, model=model)


def test_compvis_yaml_translation(compvis):
  d = compvis["model"].config.diffusion
  assert d.model_target == family.UPSCALE_TARGET and d.conditioning_key == "hybrid-adm"
  assert dict(d.low_scale) == dict(beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                                   linear_end=0.02, max_noise_level=350)
  np.testing.assert_allclose(np.asarray(compvis["model"].low_scale_schedule.alphas_cumprod),
                             compvis["low"].alphas_cumprod.numpy(), rtol=1e-5)


@pytest.mark.parametrize("noise_level", [0, 20, 350])
def test_compvis_condition_and_denoise(compvis, noise_level):
  model, lowres = compvis["model"], _lowres(5)
  noise = np.random.RandomState(6).randn(*lowres.shape).astype(np.float32)
  levels = torch.full((2,), noise_level, dtype=torch.long)
  z = np.random.RandomState(7).randn(2, 8, 8, 4).astype(np.float32)
  t = np.array([11, 777], np.int32)
  cond = model.condition(prompts=tiny_sd.PROMPTS, images=lowres, noise_level=noise_level,
                         lowres_noise=noise)
  with torch.no_grad():
    zx = compvis["low"].q_sample(_nchw(lowres), levels, noise=_nchw(noise))
    want = _nhwc(compvis["unet"](torch.cat([_nchw(z), zx], 1), torch.from_numpy(t).long(),
                                 context=torch.from_numpy(np.array(cond.context)), y=levels))
  assert_close(cond.concat, _nhwc(zx), rel=TOL, what="noised low-res input")
  np.testing.assert_array_equal(cond.y, [noise_level] * 2)
  assert_close(model.denoise(jnp.asarray(z), jnp.asarray(t), cond), want, rel=TOL,
               what="upscaler UNet")


# ------------------------------------------------------------------------------------------------
# The paper's super-resolution model as a diffusers LDMSuperResolutionPipeline folder.
# ------------------------------------------------------------------------------------------------
def test_ldm_super_resolution_folder_matches_pipeline(built, monkeypatch):
  from diffusers.pipelines.latent_diffusion import (
      pipeline_latent_diffusion_superresolution as mod)
  folder, pipe = tiny_sd.diffusers_ldm_sr_folder(built["root"])
  model = ldm_lib.LatentDiffusion.from_diffusers(folder)
  assert model.config.diffusion.conditioning_key == "concat" and model.scale_factor == 1.0
  assert model.cond_kind == "none"
  lowres = _lowres(8)  # [2, 8, 8, 3]: the latents' size (first-stage factor 2)
  x_T = np.random.RandomState(9).randn(2, 8, 8, 3).astype(np.float32)
  monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: _nchw(x_T))
  seen = []
  decode = pipe.vqvae.decode
  monkeypatch.setattr(pipe.vqvae, "decode", lambda z, *a, **k: (seen.append(z), decode(z))[1])
  with torch.no_grad():
    want_img = pipe(_nchw(lowres), num_inference_steps=5, eta=0.0, output_type="np").images
  want = _nhwc(seen[0])
  got = sampling.sample(model, images=lowres, steps=5, x_T=jnp.asarray(x_T), decode=False,
                        height=16, width=16)
  assert_close(got, want, rel=TOL, what="LDM super-resolution latents")
  images = model.sample(images=lowres, steps=5, x_T=jnp.asarray(x_T), height=16, width=16)
  assert_close(np.clip(images, -1, 1) / 2 + 0.5, want_img, rel=TOL,
               what="LDM super-resolution images")
  other = sampling.sample(model, images=_lowres(10), steps=5, x_T=jnp.asarray(x_T),
                          decode=False, height=16, width=16)
  assert np.abs(np.asarray(other) - want).max() > 1e-2
