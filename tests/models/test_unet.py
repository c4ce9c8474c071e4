"""UNetModel structure and errors: Stable Diffusion parameter counts, strict weight loading, config
validation and the diffusers-config translation. Numerical parity lives in test_unet_diffusers.py
(diffusers), test_unet_compvis.py (original CompVis code) and test_unet_remat.py (remat, bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_jax.convert import common
from ldm_jax.convert import unet as convert_unet
from ldm_jax.models.unet import UNetModel


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0, 0.2)
  return module.eval()


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _count(model, context_dim):
  x, t = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,))
  context = jnp.zeros((1, 77, context_dim))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, context)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables))


def test_parameter_counts_match_stable_diffusion():
  common_kw = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4),
                   use_spatial_transformer=True, transformer_depth=1)
  assert _count(UNetModel(num_heads=8, context_dim=768, **common_kw), 768) == 859_520_964
  assert _count(UNetModel(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                          **common_kw), 1024) == 865_910_724


_SD1_DIFFUSERS_CONFIG = {  # unet/config.json of a Stable Diffusion 1.x diffusers folder
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64}
_SD2_DIFFUSERS_CONFIG = {  # Stable Diffusion 2.1 (768-v): 64-channel heads written as head counts
    **_SD1_DIFFUSERS_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "sample_size": 96}


def test_diffusers_configs_of_stable_diffusion_translate_to_the_compvis_fields():
  base = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
              attention_resolutions=(1, 2, 4), channel_mult=(1, 2, 4, 4),
              use_spatial_transformer=True, transformer_depth=1, use_scale_shift_norm=False,
              dropout=0.0, disable_self_attentions=None)
  assert convert_unet.unet_kwargs_from_diffusers_config(_SD1_DIFFUSERS_CONFIG) == {
      **base, "num_heads": 8, "context_dim": 768, "use_linear_in_transformer": False}
  assert convert_unet.unet_kwargs_from_diffusers_config(_SD2_DIFFUSERS_CONFIG) == {
      **base, "num_head_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True}


_TINY = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
             use_spatial_transformer=True, context_dim=8)
def _tiny_inputs(batch=2, size=8):
  rs = np.random.RandomState(1)
  return (jnp.asarray(rs.randn(batch, size, size, 4), jnp.float32),
          jnp.asarray([5.0, 900.0][:batch]), jnp.asarray(rs.randn(batch, 3, 8), jnp.float32))


def _sd1_pair():
  m = _randomise(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
      cross_attention_dim=24, attention_head_dim=2))
  return _numpy(m), convert_unet.unet_kwargs_from_diffusers_config(dict(m.config))


def test_strict_loading_names_missing_unexpected_and_mismatched_keys():
  sd, kwargs = _sd1_pair()
  model = UNetModel(**kwargs)
  broken = dict(sd)
  del broken["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  broken["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
  broken["time_embedding.linear_1.weight"] = np.zeros((128, 16), np.float32)
  with pytest.raises(common.WeightLoadError) as info:
    convert_unet.unet_from_diffusers(broken, model)
  msg = str(info.value)
  assert "missing keys (1)" in msg and "attn2.to_k.weight" in msg
  assert "unexpected keys (1)" in msg and "down_blocks.0.resnets.0.extra.weight" in msg
  assert "shape mismatches (1)" in msg and "time_embedding.linear_1.weight" in msg
  # Conv-style proj_in / proj_out (SD 1.x) must not load into a linear-projection (SD 2.x) model.
  linear = UNetModel(**{**kwargs, "use_linear_in_transformer": True})
  with pytest.raises(common.WeightLoadError, match=r"proj_in.weight: checkpoint \(32, 32, 1, 1\)"):
    convert_unet.unet_from_diffusers(sd, linear)
  # diffusers keys are not CompVis keys.
  with pytest.raises(common.WeightLoadError, match="input_blocks.0.0.weight"):
    convert_unet.unet_from_compvis(sd, model)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(model_channels=48), r"model_channels=48 .* multiple of 32"),
    (dict(num_heads=3), r"num_heads=3 does not divide the 64 channels"),
    (dict(num_heads=-1, num_head_channels=24), r"num_head_channels=24 does not divide"),
    (dict(num_heads=-1), r"num_heads=-1 and num_head_channels=-1"),
    (dict(num_res_blocks=(1, 1, 1)), r"num_res_blocks=\(1, 1, 1\) has 3 entries"),
    (dict(context_dim=None), r"context_dim=None with use_spatial_transformer=True"),
    (dict(num_classes="one-hot"), r"num_classes='one-hot'"),
    (dict(num_classes=10), r"num_classes=10 but y is None"),
    (dict(context_dim=16), r"context has shape \(2, 3, 8\); expected \[B, L, context_dim=16\]"),
])
def test_invalid_configs_raise_clear_errors(overrides, pattern):
  x, t, ctx = _tiny_inputs()
  with pytest.raises(ValueError, match=pattern):
    jax.eval_shape(UNetModel(**{**_TINY, **overrides}).init, jax.random.PRNGKey(0), x, t, ctx)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(addition_embed_type="text_time"), r"addition_embed_type='text_time' is not supported"),
    (dict(freq_shift=1), r"freq_shift=1 is not supported"),
    (dict(class_embed_type="timestep"), r"class_embed_type='timestep'"),
    (dict(attention_head_dim=(2, 3)), r"neither constant nor a constant head width"),
    (dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")), r"disagree"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), r"not supported"),
])
def test_unsupported_diffusers_configs_raise(overrides, pattern):
  config = dict(_class_name="UNet2DConditionModel", block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=2)
  convert_unet.unet_kwargs_from_diffusers_config(config)  # the base config is fine
  with pytest.raises(ValueError, match=pattern):
    convert_unet.unet_kwargs_from_diffusers_config({**config, **overrides})
