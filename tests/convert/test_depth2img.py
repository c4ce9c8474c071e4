"""Depth-to-image (LatentDepth2ImageDiffusion) against diffusers' StableDiffusionDepth2ImgPipeline.

A tiny pipeline (random non-zero weights, no depth estimator: the depth map is given, as ours
always is) imported with `LatentDiffusion.from_diffusers`. img2img at strength 0.6 with guidance,
the same noise and the posterior mode on both sides: the latents and images agree to 1e-4 of
their scale in fp32. The depth preparation is checked against torch's bicubic `interpolate`.
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


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("depth2img"))
  tokenizer_dir = write_clip_tokenizer_dir(os.path.join(root, "clip_tokenizer"))
  folder, pipe = tiny_sd.diffusers_depth_folder(root, tokenizer_dir)
  return dict(root=root, folder=folder, pipe=pipe,
              model=ldm_lib.LatentDiffusion.from_diffusers(folder))


def _depth(seed=1, size=(2, 23, 37)):
  """A smooth depth map at a size unrelated to the latents (bicubic down- and up-sampling)."""
  rs = np.random.RandomState(seed)
  y, x = np.meshgrid(np.linspace(0, 1, size[1]), np.linspace(0, 1, size[2]), indexing="ij")
  return np.stack([3 + np.sin(4 * x + rs.rand()) + y * rs.rand() + 0.1 * rs.rand(*size[1:])
                   for _ in range(size[0])]).astype(np.float32)


@pytest.mark.parametrize("size", [(2, 23, 37), (1, 4, 5), (1, 16, 16)])
def test_bicubic_resize_matches_torch(size):
  d = _depth(2, size)
  want = torch.nn.functional.interpolate(torch.from_numpy(d)[:, None], size=(8, 8), mode="bicubic",
                                         align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(family.torch_bicubic_resize(d.astype(np.float64), 8, 8), want,
                             rtol=1e-5, atol=1e-5)


def test_folder_config_and_depth_condition(built):
  model, pipe = built["model"], built["pipe"]
  d = model.config.diffusion
  assert d.model_target == family.DEPTH_TARGET and d.conditioning_key == "hybrid"
  assert model.is_depth and d.depth_eps == 0.0
  depth = _depth()
  image = torch.zeros(2, 3, 16, 16)
  want = pipe.prepare_depth_map(image, torch.from_numpy(depth), 2, False, torch.float32, "cpu")
  got = model.depth_condition(depth, 8, 8)
  assert_close(got, _nhwc(want), rel=1e-5, what="depth condition")
  assert got.min() == -1.0 and got.max() == pytest.approx(1.0)


def test_img2img_with_depth_matches_pipeline(built, monkeypatch):
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_depth2img as mod
  model, pipe = built["model"], built["pipe"]
  rs = np.random.RandomState(3)
  image = rs.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  depth = _depth()
  x_T = rs.randn(2, 8, 8, 4).astype(np.float32)
  monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: _nchw(x_T))
  original = mod.retrieve_latents
  monkeypatch.setattr(mod, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                      original(out, generator, sample_mode="argmax"))
  with torch.no_grad():
    want = pipe(tiny_sd.PROMPTS, image=_nchw((image + 1) / 2), depth_map=torch.from_numpy(depth),
                negative_prompt=["blurry", "dark"], strength=0.6, num_inference_steps=5,
                guidance_scale=3.0, eta=0.0, output_type="latent").images
    want_img = _nhwc(pipe.vae.decode(want / tiny_sd.SCALE_FACTOR).sample)
  want = _nhwc(want)
  kwargs = dict(prompts=tiny_sd.PROMPTS, init_image=image, strength=0.6, depth_map=depth,
                negative_prompt=["blurry", "dark"], steps=5, guidance=3.0, x_T=jnp.asarray(x_T))
  got = sampling.sample(model, decode=False, **kwargs)
  assert_close(got, want, rel=TOL, what="depth-to-image latents")
  assert_close(sampling.sample(model, **kwargs), want_img, rel=TOL, what="depth-to-image images")
  # The depth map matters.
  other = sampling.sample(model, decode=False, **dict(kwargs, depth_map=depth[:, ::-1].copy()))
  assert np.abs(np.asarray(other) - want).max() > 1e-2


def test_depth_map_errors(built):
  model = built["model"]
  with pytest.raises(sampling.SamplingInputError, match="give a depth map"):
    sampling.sample(model, prompts=["a"], steps=1)
  with pytest.raises(sampling.SamplingInputError, match="constant"):
    sampling.sample(model, prompts=["a"], depth_map=np.ones((1, 8, 8)), steps=1)


def run_cli(args, capsys):
  code, _, err = cli_util.run_sample(args, capsys)
  return code, err.strip().splitlines()


def test_cli_depth_map(built, tmp_path, capsys):
  model = built["model"]
  depth = _depth(4, (1, 16, 16))[0]
  u8 = np.round((depth - depth.min()) / (depth.max() - depth.min()) * 255).astype(np.uint8)
  path = str(tmp_path / "depth.png")
  Image.fromarray(u8).save(path)
  out = str(tmp_path / "out")
  common = ["--diffusers", built["folder"], "--prompt", "a room", "--steps", "2", "--guidance",
            "2", "--seed", "3", "--no_progress"]
  code, err = run_cli(common + ["--depth_map", path, "--outdir", out], capsys)
  assert code == 0, err
  img = np.asarray(Image.open(os.path.join(out, "000000.png")))
  assert img.shape == (16, 16, 3)
  assert json.load(open(os.path.join(out, "samples.json")))["settings"]["depth_map"] == path
  want = ldm_lib.to_uint8(sampling.sample(model, prompts=["a room"], seeds=[3], steps=2,
                                          guidance=2.0, depth_map=u8[None].astype(np.float32)))
  np.testing.assert_array_equal(img, want[0])
  flipped = ldm_lib.to_uint8(sampling.sample(model, prompts=["a room"], seeds=[3], steps=2,
                                             guidance=2.0,
                                             depth_map=u8[None, ::-1].astype(np.float32)))
  assert np.abs(flipped[0].astype(int) - img).max() > 0
  bad = str(tmp_path / "bad")
  code, err = run_cli(common + ["--outdir", bad], capsys)
  assert code == 2 and len(err) == 1 and "give --depth_map" in err[0], err
  assert not os.path.exists(bad)


def test_compvis_ckpt_and_yaml(built):
  """A tiny v2-midas-inference.yaml-style model: 'hybrid', 5 UNet inputs, the MiDaS weights in the
  checkpoint left aside; the concat is what LatentDepth2ImageDiffusion.get_input computes from the
  estimator's output (here the given map): bicubic resize, then normalised with + 0.001."""
  import yaml
  from assets_util import randomize_
  tiny_sd.stub_omegaconf()
  from ldm.modules.diffusionmodules.openaimodel import UNetModel
  root = built["root"]
  kwargs = dict(tiny_sd.UNET_KWARGS, in_channels=5)
  unet, ema = UNetModel(**kwargs).eval(), UNetModel(**kwargs).eval()
  randomize_(unet, std=tiny_sd.WEIGHT_STD, seed=61)
  randomize_(ema, std=tiny_sd.WEIGHT_STD, seed=62)
  _, first_stage, _ = tiny_sd.compvis_modules()
  text = tiny_sd.clip_text_model(seed=63)
  text_dir = os.path.join(root, "compvis_text")
  text.save_pretrained(text_dir)
  sd = tiny_sd.compvis_state_dict(unet, first_stage, ema, text)
  sd["depth_model.model.scratch.output_conv.0.weight"] = torch.ones(2, 2)  # MiDaS, not imported
  ckpt, yaml_path = tiny_sd.compvis_checkpoint(root, text_dir, sd)
  with open(yaml_path) as f:
    cfg = yaml.safe_load(f)
  cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion"
  params = cfg["model"]["params"]
  params.update(conditioning_key="hybrid", depth_stage_config=dict(
      target="ldm.modules.midas.api.MiDaSInference", params=dict(model_type="dpt_hybrid")))
  params["unet_config"]["params"]["in_channels"] = 5
  with open(yaml_path, "w") as f:
    yaml.safe_dump(cfg, f)
  model = ldm_lib.LatentDiffusion.from_compvis(ckpt, yaml_path, use_ema=False,
                                               tokenizer_path=os.path.join(root, "clip_tokenizer"))
  assert model.is_depth and model.config.diffusion.depth_eps == 0.001
  depth = _depth(5)
  with torch.no_grad():
    cc = torch.nn.functional.interpolate(torch.from_numpy(depth)[:, None], size=(8, 8),
                                         mode="bicubic", align_corners=False)
    lo = torch.amin(cc, dim=[1, 2, 3], keepdim=True)
    hi = torch.amax(cc, dim=[1, 2, 3], keepdim=True)
    cc = 2. * (cc - lo) / (hi - lo + 0.001) - 1.
  cond = model.condition(prompts=tiny_sd.PROMPTS, depth=model.depth_condition(depth, 8, 8))
  assert_close(cond.concat, _nhwc(cc), rel=1e-5, what="CompVis depth concat")
  z = np.random.RandomState(6).randn(2, 8, 8, 4).astype(np.float32)
  t = np.array([9, 555], np.int32)
  with torch.no_grad():
    want = _nhwc(unet(torch.cat([_nchw(z), cc], 1), torch.from_numpy(t).long(),
                      context=torch.from_numpy(np.array(cond.context))))
  assert_close(model.denoise(jnp.asarray(z), jnp.asarray(t), cond), want, rel=TOL,
               what="depth UNet")
