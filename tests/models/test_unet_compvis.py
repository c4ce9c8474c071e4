"""UNetModel against the original CompVis `openaimodel.UNetModel` (SD 2.x repository version).

The reference is the `ldm` package shipped by `stable-diffusion-sdkit` (installed with --no-deps).
Every torch weight is re-randomised, the CompVis state dict goes through `unet_from_compvis`, and
the outputs must agree to 1e-4 of the output scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from assets_util import stub_omegaconf
from ldm_jax.convert import common
from ldm_jax.convert import unet as convert_unet
from ldm_jax.models.unet import UNetModel


def _reference_unet_class():
  """openaimodel.UNetModel; omegaconf is imported there only for an isinstance check."""
  stub_omegaconf()
  openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
  return openaimodel.UNetModel


CONFIGS = {
    # SD 1.x-like: conv proj_in/out, heads by count, cross-attention at both levels.
    "sd1": dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2,
                use_spatial_transformer=True, context_dim=24),
    # SD 2.x-like: linear proj, 16-channel heads, per-level res blocks, no self-attn at level 0
    # nor in the middle, attention only on the first res block of level 1 (num_attention_blocks).
    "sd2": dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=(1, 2),
                attention_resolutions=(1, 2), channel_mult=(1, 2), num_head_channels=16,
                use_spatial_transformer=True, context_dim=24, use_linear_in_transformer=True,
                disable_self_attentions=(True, False), num_attention_blocks=(1, 1),
                disable_middle_self_attn=True),
    # Class-conditional with scale-shift norm and ResBlock up/down sampling, legacy attention.
    "class": dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, num_classes=7,
                  use_scale_shift_norm=True, resblock_updown=True),
    # Unconditional legacy attention: 16-channel heads (2 and 4 heads), one head when upsampling
    # would apply (num_heads_upsample is ignored with num_head_channels, as in the original).
    "legacy": dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                   attention_resolutions=(1, 2), channel_mult=(1, 2), num_head_channels=16,
                   num_heads_upsample=1),
}


def _torch_model(cfg):
  torch.manual_seed(0)
  m = _reference_unet_class()(image_size=8, **cfg).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0, 0.2)  # every weight, including the zero-initialised out / proj_out
  return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_compvis_openaimodel(name):
  cfg = CONFIGS[name]
  tm = _torch_model(cfg)
  model = UNetModel(**cfg)
  params = convert_unet.unet_from_compvis({k: v.numpy() for k, v in tm.state_dict().items()}, model)
  rs = np.random.RandomState(0)
  x = rs.randn(2, cfg["in_channels"], 8, 8).astype(np.float32)
  t = np.array([3.0, 731.0], np.float32)
  ctx = rs.randn(2, 5, 24).astype(np.float32) if cfg.get("context_dim") else None
  y = np.array([1, 6]) if cfg.get("num_classes") else None
  with torch.no_grad():
    ref = tm(torch.from_numpy(x), torch.from_numpy(t),
             None if ctx is None else torch.from_numpy(ctx),
             None if y is None else torch.from_numpy(y)).numpy()
  opt = lambda a: None if a is None else jnp.asarray(a)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                             jnp.asarray(t), opt(ctx), opt(y))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4 * scale)


def test_compvis_strict_loading_errors():
  cfg = CONFIGS["class"]
  sd = {k: v.numpy() for k, v in _torch_model(cfg).state_dict().items()}
  model = UNetModel(**cfg)
  broken = dict(sd)
  del broken["label_emb.weight"]
  broken["output_blocks.1.2.in_layers.0.weight"] = np.zeros(5, np.float32)  # 64 expected
  broken["middle_block.1.qkv_extra.weight"] = np.zeros(1, np.float32)
  with pytest.raises(common.WeightLoadError) as info:
    convert_unet.unet_from_compvis(broken, model)
  msg = str(info.value)
  assert "missing keys (1)" in msg and "label_emb.weight" in msg
  assert "unexpected keys (1)" in msg and "middle_block.1.qkv_extra.weight" in msg
  assert "shape mismatches (1)" in msg and "output_blocks.1.2.in_layers.0.weight" in msg
  # The same weights without num_classes: label_emb is left over.
  no_classes = UNetModel(**{**cfg, "num_classes": None})
  with pytest.raises(common.WeightLoadError, match=r"unexpected keys \(1\):\n    label_emb.weight"):
    convert_unet.unet_from_compvis(sd, no_classes)
