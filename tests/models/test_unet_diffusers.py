"""UNetModel against diffusers' UNet2DConditionModel and UNet2DModel.

Every torch weight is re-randomised (including the zero-initialised conv_out / proj_out, which would
hide wiring bugs), moved through `unet_from_diffusers` with kwargs from
`unet_kwargs_from_diffusers_config` on the torch model's config, and the outputs compared at 1e-4 of
the output scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

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


def _apply(model, params, x_nchw, t, context=None, y=None, **kw):
  """Runs our model on NCHW numpy inputs and returns NCHW numpy."""
  opt = lambda a: None if a is None else jnp.asarray(a)
  out = jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))(
      params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), opt(context), opt(y))
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


def _check_parity(torch_model, x, t, context=None, y=None):
  kwargs = convert_unet.unet_kwargs_from_diffusers_config(dict(torch_model.config))
  model = UNetModel(**kwargs)
  params = convert_unet.unet_from_diffusers(_numpy(torch_model), model)
  extra = {} if context is None else {"encoder_hidden_states": torch.from_numpy(context)}
  if y is not None:
    extra["class_labels"] = torch.from_numpy(y)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), **extra).sample.numpy()
  out = _apply(model, params, x, t, context, y)
  assert out.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 0.1  # a dead network (e.g. zero conv_out) would make the comparison vacuous
  np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4 * scale)
  return kwargs


_RS = np.random.RandomState(0)
_T = np.array([3.0, 731.0], np.float32)


def test_diffusers_sd1_style_class_labels():
  """Conv proj_in/out, heads by count (attention_head_dim is a head count there), nn.Embedding."""
  m = _randomise(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
      cross_attention_dim=24, attention_head_dim=2, num_class_embeds=5))
  kwargs = _check_parity(m, _RS.randn(2, 4, 8, 8).astype(np.float32), _T,
                         _RS.randn(2, 5, 24).astype(np.float32), np.array([1, 4]))
  assert kwargs["num_heads"] == 2 and kwargs["attention_resolutions"] == (1,)
  assert not kwargs["use_linear_in_transformer"] and kwargs["num_classes"] == 5


def test_diffusers_sd2_style():
  """Linear proj, 16-channel heads, per-level depth / res blocks, only-cross attention,
  scale-shift norm and a projection class embedding (num_classes='sequential')."""
  m = _randomise(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 2),
      cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
      transformer_layers_per_block=(1, 2), only_cross_attention=(False, True),
      upcast_attention=True, resnet_time_scale_shift="scale_shift",
      class_embed_type="projection", projection_class_embeddings_input_dim=6))
  kwargs = _check_parity(m, _RS.randn(2, 4, 8, 8).astype(np.float32), _T,
                         _RS.randn(2, 5, 24).astype(np.float32), _RS.randn(2, 6).astype(np.float32))
  assert kwargs["num_head_channels"] == 16 and kwargs["transformer_depth"] == (1, 2)
  assert kwargs["num_classes"] == "sequential"
  assert kwargs["disable_self_attentions"] == (False, True)


def test_diffusers_unet2d_legacy_attention():
  """Unconditional-LDM style: AttnDownBlock2D / AttnUpBlock2D, 16-channel heads (2 and 4 heads)."""
  m = _randomise(UNet2DModel(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
      down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1, attention_head_dim=16))
  kwargs = _check_parity(m, _RS.randn(2, 3, 8, 8).astype(np.float32), _T)
  assert kwargs["num_head_channels"] == 16 and "use_spatial_transformer" not in kwargs


def test_diffusers_unet2d_resblock_updown_scale_shift_classes():
  m = _randomise(UNet2DModel(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
      down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), layers_per_block=1,
      attention_head_dim=None, downsample_type="resnet", upsample_type="resnet",
      resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, num_class_embeds=4))
  kwargs = _check_parity(m, _RS.randn(2, 3, 8, 8).astype(np.float32), _T, y=np.array([0, 3]))
  assert kwargs["resblock_updown"] and kwargs["num_heads"] == 1 and kwargs["use_scale_shift_norm"]
