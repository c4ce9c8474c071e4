"""The noisy-latent classifier of classifier guidance: the encoder half of the UNet.

`EncoderUNet` is guided-diffusion's `EncoderUNetModel`, which CompVis copied into `openaimodel.py`
and trains on noised latents (`NoisyLatentImageClassifier`): the UNet's input blocks and middle
block, conditioned on the diffusion timestep, then a pooling head that maps the features to class
logits. NHWC; it maps (x_t [B, H, W, in_channels], t [B]) to logits [B, num_classes].

The trunk reuses the UNet's own pieces: its block layout (`UNetModel.layout()`, input and middle
blocks only), `unet.ResBlock`, the legacy `attention.AttentionBlock`, `layers.Downsample` and the
time embedding, so a module name means the same thing in both networks: `time_embed_0/2`,
`input_blocks_{n}_{m}`, `middle_block_{m}` for torch `time_embed.0/2`, `input_blocks.n.m`,
`middle_block.m`. The head's modules are named `out_{i}` after their index i in the torch
`out` Sequential.

Heads (`pool`):
  'adaptive'    GroupNorm, SiLU, global average, zero-initialised 1x1 conv -> logits.
  'attention'   GroupNorm, SiLU, `AttentionPool2d`: the mean token attends over itself and all
                positions (learned positional embedding), projected to logits. CompVis's default.
  'spatial'     the spatial means of every input block's output and of the middle block's,
                concatenated, then Linear(2048), ReLU, Linear -> logits.
  'spatial_v2'  the same features, Linear(2048), GroupNorm, SiLU, Linear -> logits.
As in the original's fp16 mode, the trunk computes in `dtype` and the head in float32.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax import kernels
from ldm_jax.models import attention as attention_lib
from ldm_jax.models import layers
from ldm_jax.models import unet as unet_lib

Dtype = Any
POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
# Width of the spatial heads' hidden layer: a constant of the original, not a constructor argument.
SPATIAL_HIDDEN = 2048


class AttentionPool2d(nn.Module):
  """CLIP-style attention pooling: one query (the mean token) over [mean, positions].

  The positional embedding is [1 + spatial^2, C] (torch keeps it transposed, [C, 1 + spatial^2]);
  qkv_proj and c_proj are the original's 1x1 conv1d as Dense layers. q, k and v are split first
  and heads second (guided-diffusion's `QKVAttention`, not the legacy per-head interleaving).
  """
  spatial: int
  head_channels: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] with H = W = spatial. Returns [B, out_features]."""
    b, height, width, channels = x.shape
    if (height, width) != (self.spatial, self.spatial):
      raise ValueError(f"AttentionPool2d: features are {height}x{width}; expected "
                       f"{self.spatial}x{self.spatial} (image_size // 2^(levels - 1)), the size "
                       f"its positional embedding was built for.")
    if channels % self.head_channels:
      raise ValueError(f"AttentionPool2d: head_channels={self.head_channels} does not divide the "
                       f"{channels} feature channels.")
    heads, length = channels // self.head_channels, height * width + 1
    tokens = x.reshape(b, height * width, channels)  # [B, HW, C], row-major positions
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)  # [B, L, C]
    pos = self.param("positional_embedding", nn.initializers.normal(channels ** -0.5),
                     (length, channels), self.param_dtype)
    tokens = (tokens + pos.astype(tokens.dtype)).astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = nn.Dense(3 * channels, name="qkv_proj", **kw)(tokens)  # [B, L, 3C]
    split = lambda a: a.reshape(b, -1, heads, self.head_channels)  # [B, L, heads, ch]
    q, k, v = (split(qkv[..., i * channels:(i + 1) * channels]) for i in range(3))
    # Only the mean token's output is read, so it is the only query computed.
    out = kernels.attention(q[:, :1], k, v, scale=self.head_channels ** -0.5)  # [B, 1, heads, ch]
    out = out.reshape(b, channels)  # heads concatenated head-major, as the original's reshape
    return nn.Dense(self.out_features, name="c_proj", **kw)(out)  # [B, out_features]


class EncoderUNet(nn.Module):
  """guided-diffusion / CompVis `EncoderUNetModel` in Flax; fields as in the original.

  num_classes is the original's out_channels. image_size is the input's height and width; only
  the 'attention' head depends on it (its positional embedding covers image_size // 2^(levels-1)
  squared positions). num_head_channels (or num_heads) sets the trunk's attention heads; the
  'attention' head needs num_head_channels. The input conv has model_channels outputs, as in
  CompVis (guided-diffusion gives it channel_mult[0] * model_channels, the same for the usual
  channel_mult[0] = 1). The original's use_new_attention_order=True is not supported: the trunk's
  attention is the legacy AttentionBlock every LDM checkpoint uses.
  """
  in_channels: int
  model_channels: int
  num_classes: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]
  image_size: int = 0
  dropout: float = 0.0
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_heads: int = 1
  num_head_channels: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  pool: str = "adaptive"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def trunk_layout(self) -> tuple[list[list[unet_lib.Layer]], list[unet_lib.Layer]]:
    """(input_blocks, middle_block) as `unet.Layer` lists, in torch order; validates the fields."""
    if self.pool not in POOLS:
      raise ValueError(f"EncoderUNet.pool={self.pool!r}; expected one of {POOLS}.")
    if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
      raise ValueError(f"EncoderUNet.num_res_blocks={self.num_res_blocks!r}; expected a positive "
                       f"int (the original has the same number of blocks at every level).")
    if self.num_classes < 1:
      raise ValueError(f"EncoderUNet.num_classes={self.num_classes}; expected at least 1.")
    if self.pool == "attention":
      if self.num_head_channels == -1:
        raise ValueError("EncoderUNet.pool='attention' needs num_head_channels (the attention "
                         "head's channels per head); got -1.")
      factor = 2 ** (len(self.channel_mult) - 1)
      if self.image_size <= 0 or self.image_size % factor:
        raise ValueError(f"EncoderUNet.image_size={self.image_size} with pool='attention'; "
                         f"expected the input's size, a positive multiple of {factor}.")
    # The encoder's blocks are exactly the UNet's input and middle blocks for the same fields.
    trunk = unet_lib.UNetModel(
        in_channels=self.in_channels, model_channels=self.model_channels,
        out_channels=self.in_channels, num_res_blocks=self.num_res_blocks,
        attention_resolutions=tuple(self.attention_resolutions),
        channel_mult=tuple(self.channel_mult), num_heads=self.num_heads,
        num_head_channels=self.num_head_channels, resblock_updown=self.resblock_updown,
        parent=None)  # a description only, never a submodule
    inputs, middle, _ = trunk.layout()
    return inputs, middle

  def feature_size(self) -> int:
    """Width of the spatial heads' input: the channels of every input block and the middle."""
    inputs, middle = self.trunk_layout()
    return sum(block[-1].channels for block in inputs) + middle[-1].channels

  def _layer(self, layer: unet_lib.Layer, h, emb, deterministic):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=layer.name)
    if layer.kind == "conv_in":
      return layers.conv(layer.channels, 3, **kw)(h)
    if layer.kind in ("res", "down_res"):
      resample = "down" if layer.kind == "down_res" else None
      return unet_lib.ResBlock(layer.channels, self.dropout, self.use_scale_shift_norm, resample,
                               **kw)(h, emb, deterministic)
    if layer.kind == "attention":
      return attention_lib.AttentionBlock(layer.heads, **kw)(h)
    if layer.kind == "down":
      return layers.Downsample(layer.channels, self.conv_resample, "unet", **kw)(h)
    raise AssertionError(layer.kind)

  @nn.compact
  def __call__(self, x, timesteps, *, deterministic: bool = True):
    """x: [B, H, W, in_channels] noisy latents; timesteps: [B] diffusion steps (the same integer
    index the denoiser gets). Returns float32 logits [B, num_classes]. Dropout draws from the
    'dropout' rng when not deterministic."""
    inputs, middle = self.trunk_layout()
    unet_lib.check_input("EncoderUNet", x, self.in_channels, len(self.channel_mult))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ted = 4 * self.model_channels
    t_emb = layers.timestep_embedding(timesteps, self.model_channels)  # [B, mc] fp32
    emb = nn.Dense(ted, name="time_embed_0", **kw)(t_emb)
    emb = nn.Dense(ted, name="time_embed_2", **kw)(nn.silu(emb))  # [B, 4 mc]

    h = x.astype(self.dtype)
    spatial = self.pool.startswith("spatial")
    means = []  # per-block spatial means, read by the spatial heads only
    for block in inputs:
      for layer in block:
        h = self._layer(layer, h, emb, deterministic)
      if spatial:
        means.append(h.astype(jnp.float32).mean(axis=(1, 2)))  # [B, C_block]
    for layer in middle:
      h = self._layer(layer, h, emb, deterministic)  # [B, H / f, W / f, C]
    if spatial:
      means.append(h.astype(jnp.float32).mean(axis=(1, 2)))
    return self._head(h.astype(jnp.float32), means)

  def _head(self, h, means):
    """h: [B, H / f, W / f, C] float32 trunk output; means: per-block [B, C_i]. -> [B, classes]."""
    f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    if self.pool.startswith("spatial"):
      feats = jnp.concatenate(means, axis=-1)  # [B, feature_size]
      hid = nn.Dense(SPATIAL_HIDDEN, name="out_0", **f32)(feats)  # [B, 2048]
      if self.pool == "spatial":
        return nn.Dense(self.num_classes, name="out_2", **f32)(nn.relu(hid))
      hid = nn.silu(layers.GroupNorm(epsilon=1e-5, name="out_1", **f32)(hid))
      return nn.Dense(self.num_classes, name="out_3", **f32)(hid)  # [B, classes]
    h = nn.silu(layers.GroupNorm(epsilon=1e-5, name="out_0", **f32)(h))
    if self.pool == "adaptive":
      # Zero-initialised as in the original, so a fresh classifier starts at uniform logits.
      return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="out_3",
                      **f32)(h.mean(axis=(1, 2)))  # [B, classes]
    spatial = self.image_size // 2 ** (len(self.channel_mult) - 1)
    return AttentionPool2d(spatial, self.num_head_channels, self.num_classes, name="out_2",
                           **f32)(h)  # [B, classes]


# UNetModel fields that EncoderUNet shares. CompVis builds the classifier from the diffusion
# model's unet_config and lets its constructor swallow the rest (context_dim, transformer fields).
_SHARED_FIELDS = ("model_channels", "num_res_blocks", "attention_resolutions", "dropout",
                  "channel_mult", "conv_resample", "num_heads", "num_head_channels",
                  "use_scale_shift_norm", "resblock_updown")


def encoder_kwargs_from_unet(unet_kwargs: dict, *, num_classes: int, image_size: int,
                             pool: str = "attention") -> dict:
  """EncoderUNet kwargs for the classifier of a latent diffusion model, as CompVis builds it.

  CompVis's `NoisyLatentImageClassifier` copies the diffusion UNet's config, reads the latents
  (in_channels = the UNet's out_channels), outputs num_classes logits and defaults to the
  attention head; everything transformer-specific is dropped (its trunk has plain attention).
  image_size is the latent size.
  """
  kwargs = {k: unet_kwargs[k] for k in _SHARED_FIELDS if k in unet_kwargs}
  if "out_channels" not in unet_kwargs:
    raise ValueError("encoder_kwargs_from_unet: unet_kwargs has no 'out_channels'; expected the "
                     "diffusion UNet's kwargs (the classifier reads its latents).")
  return dict(kwargs, in_channels=unet_kwargs["out_channels"], num_classes=num_classes,
              image_size=image_size, pool=pool)
