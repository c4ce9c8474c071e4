"""End-to-end import of a tiny original CompVis / Stable Diffusion v1 checkpoint + YAML.

The reference is the original code: `openaimodel.UNetModel` and the first stage's Encoder/Decoder
from the `ldm` package of `stable-diffusion-sdkit`, and transformers' CLIPTextModel (what
FrozenCLIPEmbedder runs), every weight re-drawn non-zero. They are saved as a Lightning-style
`.ckpt` (raw UNet, EMA copies under `model_ema.*`, SD 1.x text-model key layout, schedule buffers)
with a hand-written v1-inference-style YAML. `LatentDiffusion.from_compvis` must reproduce each
network to 1e-4 of the output scale (fp32); broken inputs must fail loudly; the CLIs must run.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny_sd
from assets_util import assert_close
from ldm_jax import ldm as ldm_lib
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.models.tokenizers import write_clip_tokenizer_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNET_OUT_BIAS = "model.diffusion_model.out.2.bias"
UNET_OUT_BIAS_EMA = "model_ema.diffusion_modelout2bias"
DECODER_OUT_BIAS = "first_stage_model.decoder.conv_out.bias"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Torch references, the .ckpt + YAML and our raw-weight model, shared by every test here."""
  root = str(tmp_path_factory.mktemp("compvis_import"))
  tokenizer_dir = write_clip_tokenizer_dir(os.path.join(root, "clip_tokenizer"))
  text = tiny_sd.clip_text_model(seed=8)
  text_dir = os.path.join(root, "text_model")  # `version:` in the YAML: a local config.json
  text.save_pretrained(text_dir)
  unet, first_stage, ema = tiny_sd.compvis_modules()
  sd = tiny_sd.compvis_state_dict(unet, first_stage, ema, text)
  ckpt, yaml_path = tiny_sd.compvis_checkpoint(root, text_dir, sd)
  model = ldm_lib.LatentDiffusion.from_compvis(ckpt, yaml_path, tokenizer_path=tokenizer_dir,
                                               use_ema=False)
  return dict(root=root, tokenizer_dir=tokenizer_dir, text=text, text_dir=text_dir, unet=unet,
              first_stage=first_stage, ema=ema, sd=sd, ckpt=ckpt, yaml=yaml_path, model=model)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_context(built, prompts):
  tok = transformers.CLIPTokenizer.from_pretrained(built["tokenizer_dir"], local_files_only=True)
  ids = tok(prompts, padding="max_length", max_length=77, truncation=True,
            return_tensors="pt").input_ids
  with torch.no_grad():
    return ids.numpy(), built["text"](ids).last_hidden_state.numpy()  # [B, 77, 32]


def _unet_inputs(built):
  rs = np.random.RandomState(0)
  z = rs.randn(2, 8, 8, 4).astype(np.float32)  # [B, h, w, C]
  t = np.array([3, 731], np.int32)
  _, ctx = _torch_context(built, tiny_sd.PROMPTS)
  return z, t, ctx


def _reference_eps(unet, z, t, ctx):
  with torch.no_grad():
    return _nhwc(unet(_nchw(z), torch.from_numpy(t).long(), torch.from_numpy(ctx)))


def test_config_from_yaml(built):
  model = built["model"]
  assert model.config.diffusion.conditioning_key == "crossattn"
  assert model.scale_factor == pytest.approx(tiny_sd.SCALE_FACTOR)
  assert model.cond_kind == "clip" and model.config.cond_stage.kwargs.width == 32
  # CompVis 'linear' = sqrt-spaced betas: the checkpoint's own alphas_cumprod buffer.
  np.testing.assert_allclose(np.asarray(model.schedule.alphas_cumprod),
                             built["sd"]["alphas_cumprod"].numpy(), rtol=1e-5)


def test_text_conditioning_matches_clip_text_model(built):
  prompts = tiny_sd.PROMPTS + [""]
  ids, want = _torch_context(built, prompts)
  np.testing.assert_array_equal(built["model"].tokenize(prompts), ids)
  assert_close(built["model"].condition(prompts=prompts).context, want, what="text conditioning")
  assert np.abs(want).max() > 0.1


def test_denoise_matches_original_unet_raw_and_ema(built):
  z, t, ctx = _unet_inputs(built)
  cond = ldm_lib.Conditioning(context=jnp.asarray(ctx))
  want_raw = _reference_eps(built["unet"], z, t, ctx)
  assert_close(built["model"].denoise(jnp.asarray(z), jnp.asarray(t), cond), want_raw,
               what="denoise (raw weights)")
  ema_model = ldm_lib.LatentDiffusion.from_compvis(
      built["ckpt"], built["yaml"], tokenizer_path=built["tokenizer_dir"], use_ema=True)
  want_ema = _reference_eps(built["ema"], z, t, ctx)
  assert_close(ema_model.denoise(jnp.asarray(z), jnp.asarray(t), cond), want_ema,
               what="denoise (EMA weights)")
  # The two weight sets really differ, so each comparison picked the right one.
  assert np.abs(want_raw - want_ema).max() > 0.1 * np.abs(want_raw).max()
  # EMA covers the UNet only: first stage and text encoder are the same in both.
  np.testing.assert_array_equal(
      np.asarray(ema_model.condition(prompts=tiny_sd.PROMPTS).context),
      np.asarray(built["model"].condition(prompts=tiny_sd.PROMPTS).context))


def test_encode_decode_match_original_first_stage(built):
  fs, model = built["first_stage"], built["model"]
  rs = np.random.RandomState(1)
  images = rs.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want_z = _nhwc(fs.encode(_nchw(images)).mode()) * tiny_sd.SCALE_FACTOR
  assert_close(model.encode(jnp.asarray(images)), want_z, what="encode")
  z = rs.randn(2, 8, 8, 4).astype(np.float32)
  with torch.no_grad():
    want_x = _nhwc(fs.decode(_nchw(z) / tiny_sd.SCALE_FACTOR))
  assert_close(model.decode(jnp.asarray(z)), want_x, what="decode")
  assert np.abs(want_x).max() > 0.1


def _save_without(built, name, *keys):
  path = os.path.join(built["root"], name)
  torch.save({"state_dict": {k: v for k, v in built["sd"].items() if k not in keys},
              "global_step": 1}, path)
  return path


def test_missing_tensor_and_wrong_yaml_fail_loudly(built):
  root, tok = built["root"], built["tokenizer_dir"]
  # A first-stage tensor removed.
  broken_ckpt = _save_without(built, "broken.ckpt", DECODER_OUT_BIAS)
  with pytest.raises(WeightLoadError, match=r"missing keys \(1\)") as info:
    ldm_lib.LatentDiffusion.from_compvis(broken_ckpt, built["yaml"], tokenizer_path=tok)
  assert "decoder.conv_out.bias" in str(info.value)
  # A UNet weight removed together with its EMA copy: missing from either weight set.
  no_unet_bias = _save_without(built, "no_unet_bias.ckpt", UNET_OUT_BIAS, UNET_OUT_BIAS_EMA)
  for use_ema in (False, True):
    with pytest.raises(WeightLoadError, match=r"missing keys \(1\)") as info:
      ldm_lib.LatentDiffusion.from_compvis(no_unet_bias, built["yaml"], tokenizer_path=tok,
                                           use_ema=use_ema)
    assert "out.2.bias" in str(info.value)
  # Only the raw UNet weight removed: its EMA copy is left without a weight to replace.
  orphan = _save_without(built, "orphan_ema.ckpt", UNET_OUT_BIAS)
  with pytest.raises(ValueError, match=UNET_OUT_BIAS_EMA[len("model_ema."):]) as info:
    ldm_lib.LatentDiffusion.from_compvis(orphan, built["yaml"], tokenizer_path=tok)
  assert str(orphan) in str(info.value)  # the message names the checkpoint
  wide_yaml = tiny_sd.write_yaml(os.path.join(root, "wide.yaml"), built["text_dir"],
                                 model_channels=64)
  with pytest.raises(WeightLoadError, match="shape mismatches") as info:
    ldm_lib.LatentDiffusion.from_compvis(built["ckpt"], wide_yaml,
                                         tokenizer_path=built["tokenizer_dir"])
  assert "input_blocks.0.0.weight" in str(info.value)
  # The CLI turns it into one line on stderr and exit code 2.
  proc = _run(["sample.py", "--compvis_ckpt", broken_ckpt, "--compvis_yaml", built["yaml"],
               "--tokenizer", built["tokenizer_dir"], "--prompt", "a cat", "--steps", "2",
               "--outdir", os.path.join(root, "never")])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sample.py: error:"), proc.stderr[-2000:]
  assert "decoder.conv_out.bias" in lines[0]
  assert not os.path.exists(os.path.join(root, "never"))


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _read_samples(outdir, n):
  names = sorted(os.listdir(outdir))
  assert names == [f"{i:06d}.png" for i in range(n)] + ["grid.png", "samples.json"], names
  with open(os.path.join(outdir, "samples.json")) as f:
    meta = json.load(f)
  images = [np.asarray(Image.open(os.path.join(outdir, f"{i:06d}.png"))) for i in range(n)]
  assert all(im.shape == (16, 16, 3) for im in images)
  return meta, images


def test_sample_cli_and_convert_cli(built):
  root = built["root"]
  src = ["--compvis_ckpt", built["ckpt"], "--compvis_yaml", built["yaml"],
         "--tokenizer", built["tokenizer_dir"]]
  common = ["--prompt", tiny_sd.PROMPTS[0], "--num_samples", "2", "--steps", "3",
            "--guidance", "3", "--no_progress"]
  direct = os.path.join(root, "samples_ckpt")
  proc = _run(["sample.py"] + src + ["--outdir", direct] + common)
  assert proc.returncode == 0, proc.stderr[-2000:]
  meta, images = _read_samples(direct, 2)
  assert [s["prompt"] for s in meta["samples"]] == [tiny_sd.PROMPTS[0]] * 2
  assert meta["settings"]["use_ema"] is True  # sample.py's default
  assert not np.array_equal(images[0], images[1])  # different seeds
  # Convert with the EMA weights (what sample.py used), then sample from the model directory.
  out = os.path.join(root, "converted")
  proc = _run(["-m", "ldm_jax.convert"] + src + ["--use_ema", "--out", out])
  assert proc.returncode == 0, proc.stderr[-2000:]
  converted = os.path.join(root, "samples_converted")
  proc = _run(["sample.py", "--checkpoint", out, "--outdir", converted] + common)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, images_converted = _read_samples(converted, 2)
  for a, b in zip(images, images_converted):
    np.testing.assert_array_equal(a, b)
