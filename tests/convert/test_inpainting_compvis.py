"""Inpainting models from original CompVis / Stability `.ckpt` + YAML, against the original modules.

* Stable Diffusion inpainting (`LatentInpaintDiffusion`, conditioning 'hybrid'): the tiny UNet is
  `openaimodel.UNetModel` with 9 input channels; the reference concat is what
  `LatentInpaintDiffusion.get_input` builds, in the YAML's `concat_keys` order (tried both ways).
* The paper's `inpainting_big` (cond stage `__is_first_stage__`, VQ-f4 without attention): the
  reference condition is what its `scripts/inpaint.py` builds from the first stage's Encoder and
  quant_conv; the checkpoint repeats the first stage under cond_stage_model, as CompVis saves it.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_sd
from assets_util import assert_close, randomize_
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.models.tokenizers import write_clip_tokenizer_dir

TOL = 1e-4


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _image_and_keep(size=16):
  rs = np.random.RandomState(7)
  image = rs.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  keep = np.ones((2, size, size, 1), np.float32)
  keep[0, :, size // 2 + 1:] = 0.0
  keep[1, 3:size - 3, 1:size // 2] = 0.0
  return image, keep


# ------------------------------------------------------------------------------------------------
# Stable Diffusion inpainting from .ckpt + YAML.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sd_inpaint_compvis"))
  tokenizer_dir = write_clip_tokenizer_dir(os.path.join(root, "clip_tokenizer"))
  text = tiny_sd.clip_text_model(seed=8)
  text_dir = os.path.join(root, "text_model")
  text.save_pretrained(text_dir)
  unet, first_stage, ema = tiny_sd.compvis_modules(in_channels=9)
  sd = tiny_sd.compvis_state_dict(unet, first_stage, ema, text)
  ckpt, _ = tiny_sd.compvis_checkpoint(root, text_dir, sd)
  models = {}
  for keys in (("mask", "masked_image"), ("masked_image", "mask")):
    yaml_path = tiny_sd.write_yaml(os.path.join(root, f"{keys[0]}_first.yaml"), text_dir,
                                   concat_keys=keys)
    models[keys] = ldm_lib.LatentDiffusion.from_compvis(ckpt, yaml_path, use_ema=False,
                                                        tokenizer_path=tokenizer_dir)
  return dict(unet=unet, first_stage=first_stage, text=text, models=models,
              tokenizer_dir=tokenizer_dir)


def _reference_concat(first_stage, image, keep, keys):
  """LatentInpaintDiffusion.get_input: each concat key in order; the mask (1 = repaint) resized
  by interpolate, the masked image encoded and scaled (posterior mode: we are deterministic)."""
  hole = _nchw(1.0 - keep)
  masked = _nchw(image) * (1.0 - hole)
  with torch.no_grad():
    parts = {"mask": torch.nn.functional.interpolate(hole, size=(8, 8)),
             "masked_image": first_stage.encode(masked).mode() * tiny_sd.SCALE_FACTOR}
  return torch.cat([parts[k] for k in keys], 1)  # [B, 5, 8, 8]


@pytest.mark.parametrize("keys", [("mask", "masked_image"), ("masked_image", "mask")])
def test_sd_inpainting_denoise_follows_concat_keys(sd_inpaint, keys):
  model = sd_inpaint["models"][keys]
  assert model.config.diffusion.conditioning_key == "hybrid" and model.is_inpainting
  image, keep = _image_and_keep()
  c_concat = _reference_concat(sd_inpaint["first_stage"], image, keep, keys)
  cond = model.condition(prompts=tiny_sd.PROMPTS, images=image * keep, mask=keep)
  assert_close(cond.concat, _nhwc(c_concat), rel=TOL, what=f"concat {keys}")
  z = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
  t = np.array([17, 640], np.int32)
  ctx = np.array(cond.context)
  with torch.no_grad():
    want = _nhwc(sd_inpaint["unet"](torch.cat([_nchw(z), c_concat], 1), torch.from_numpy(t).long(),
                                    torch.from_numpy(ctx)))
  got = model.denoise(jnp.asarray(z), jnp.asarray(t), cond)
  assert_close(got, want, rel=TOL, what="inpainting UNet")
  assert np.abs(want).max() > 0.1


def test_sd_inpainting_ckpt_samples_and_keeps_the_known_region(sd_inpaint):
  model = sd_inpaint["models"][("mask", "masked_image")]
  image, keep = _image_and_keep()
  out = model.sample(prompts=tiny_sd.PROMPTS, init_image=image, mask=keep, steps=3, guidance=2.0,
                     negative_prompt="a dog", seed=3)
  assert out.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(out[keep[..., 0] == 1], image[keep[..., 0] == 1])
  assert np.abs(out[keep[..., 0] == 0] - image[keep[..., 0] == 0]).mean() > 0.05


# ------------------------------------------------------------------------------------------------
# The paper's inpainting_big.
# ------------------------------------------------------------------------------------------------
VQ_DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
             ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="none")
PAPER_UNET = dict(image_size=8, in_channels=7, out_channels=3, model_channels=32,
                  attention_resolutions=[], num_res_blocks=1, channel_mult=[1, 2], num_heads=1)
PAPER_YAML = """# Tiny model in the structure of the LDM inpainting_big config.
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: masked_image
    image_size: 8
    channels: 3
    concat_mode: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {unet}
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 16
        ddconfig: {dd}
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: __is_first_stage__
"""


class VQFirstStage(torch.nn.Module):
  """The weights of ldm.models.autoencoder.VQModelInterface under its names; `encode` as its
  (the pre-quantisation latent, what the inpainting script concatenates)."""

  def __init__(self):
    super().__init__()
    from ldm.modules.diffusionmodules import model as ae_model
    self.encoder = ae_model.Encoder(**VQ_DD)
    self.decoder = ae_model.Decoder(**VQ_DD)
    self.quant_conv = torch.nn.Conv2d(3, 3, 1)
    self.post_quant_conv = torch.nn.Conv2d(3, 3, 1)
    self.quantize = torch.nn.Module()
    self.quantize.embedding = torch.nn.Embedding(16, 3)

  def encode(self, x):
    return self.quant_conv(self.encoder(x))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
  import json
  tiny_sd.stub_omegaconf()
  from ldm.modules.diffusionmodules.openaimodel import UNetModel
  root = str(tmp_path_factory.mktemp("inpainting_big"))
  unet = UNetModel(**PAPER_UNET).eval()
  randomize_(unet, std=tiny_sd.WEIGHT_STD, seed=11)
  fs = VQFirstStage().eval()
  randomize_(fs, std=tiny_sd.WEIGHT_STD, seed=12)
  sd = {"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()}
  for k, v in fs.state_dict().items():
    sd["first_stage_model." + k] = v.clone()
    sd["cond_stage_model." + k] = v.clone()  # cond_stage_model is first_stage_model
  ckpt = os.path.join(root, "inpainting_big.ckpt")
  torch.save({"state_dict": sd}, ckpt)
  yaml_path = os.path.join(root, "inpainting_big.yaml")
  with open(yaml_path, "w") as f:
    f.write(PAPER_YAML.format(unet=json.dumps(PAPER_UNET), dd=json.dumps(VQ_DD)))
  model = ldm_lib.LatentDiffusion.from_compvis(ckpt, yaml_path)
  return dict(root=root, unet=unet, fs=fs, sd=sd, ckpt=ckpt, yaml=yaml_path, model=model)


def test_inpainting_big_condition_and_denoise_match_the_script(paper):
  model = paper["model"]
  assert model.cond_kind == "first_stage" and model.is_inpainting
  image, keep = _image_and_keep()
  # scripts/inpaint.py: image and mask in [0, 1], masked = (1 - mask) * image, all mapped to
  # [-1, 1]; c = cond_stage_model.encode(masked) with the mask interpolated and concatenated.
  image01, hole = _nchw((image + 1) / 2), _nchw(1.0 - keep)
  masked = ((1 - hole) * image01) * 2 - 1
  with torch.no_grad():
    c = paper["fs"].encode(masked)
    c = torch.cat([c, torch.nn.functional.interpolate(hole * 2 - 1, size=c.shape[-2:])], 1)
  cond = model.condition(images=image * keep, mask=keep)
  assert_close(cond.concat, _nhwc(c), rel=TOL, what="inpainting_big condition")
  z = np.random.RandomState(2).randn(2, 8, 8, 3).astype(np.float32)
  t = np.array([5, 900], np.int32)
  with torch.no_grad():
    want = _nhwc(paper["unet"](torch.cat([_nchw(z), c], 1), torch.from_numpy(t).long()))
  assert_close(model.denoise(jnp.asarray(z), jnp.asarray(t), cond), want, rel=TOL,
               what="inpainting_big UNet")
  out = model.sample(init_image=image, mask=keep, steps=2, seed=0)
  np.testing.assert_array_equal(out[keep[..., 0] == 1], image[keep[..., 0] == 1])


def test_inpainting_big_cond_stage_must_repeat_the_first_stage(paper):
  sd = dict(paper["sd"])
  key = "cond_stage_model.quant_conv.bias"
  sd[key] = sd[key] + 1.0
  bad = os.path.join(paper["root"], "bad.ckpt")
  torch.save({"state_dict": sd}, bad)
  with pytest.raises(WeightLoadError, match="quant_conv.bias differs from first_stage_model"):
    ldm_lib.LatentDiffusion.from_compvis(bad, paper["yaml"])
  # Without the copy (a pruned file) the model imports the same.
  pruned = {k: v for k, v in paper["sd"].items() if not k.startswith("cond_stage_model.")}
  path = os.path.join(paper["root"], "pruned.ckpt")
  torch.save({"state_dict": pruned}, path)
  again = ldm_lib.LatentDiffusion.from_compvis(path, paper["yaml"])
  import jax
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(paper["model"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
