"""Building blocks shared by the autoencoder, the UNet and the text encoders.

Everything is NHWC. Each layer takes `dtype` (compute) and `param_dtype` (storage); normalisation
statistics and softmax always run in float32 whatever the compute dtype, as in the original models
(their `GroupNorm32` upcasts, and attention softmax is taken in fp32).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import kernels

Dtype = Any


class _ScaleBias(nn.Module):
  """Per-channel affine parameters with nn.GroupNorm's / nn.LayerNorm's names and initialisers."""
  channels: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return (self.param("scale", nn.initializers.ones, (self.channels,), self.param_dtype),
            self.param("bias", nn.initializers.zeros, (self.channels,), self.param_dtype))


class GroupNorm(nn.Module):
  """GroupNorm computed in float32, returned in the compute dtype.

  x is [B, ..., C]; each sample is normalised over all its positions and the C / G channels of
  each group. Same parameters (a child "norm" holding "scale" and "bias") and same statistics as
  nn.GroupNorm with its default fast variance (E[x^2] - E[x]^2, clipped at 0), but the sums run
  over the positions first ([B, C]) and over each group's channels second: two row reductions
  that XLA:CPU runs much faster than nn.GroupNorm's reduction over axes (1, 2, 4) of
  [B, H, W, G, C / G] (see benchmarks/README.md, 2026-11-22, commit c837307: the kl-f8 decode).

  The epsilon has no default on purpose: the UNet uses 1e-5, the autoencoder and the spatial
  transformer 1e-6, and a wrong epsilon silently changes a loaded model's outputs.
  """
  epsilon: float
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: channels={channels} is not divisible by num_groups="
                       f"{self.num_groups}.")
    scale, bias = _ScaleBias(channels, self.param_dtype, name="norm")()
    x = x.astype(jnp.float32)
    batch, per_group = x.shape[0], channels // self.num_groups
    positions = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * per_group
    broadcast = (batch,) + (1,) * len(positions) + (channels,)

    def group_mean(values):  # [B, ..., C] -> per-group means broadcast back to [B, 1.., C]
      per_channel = jnp.sum(values, axis=positions)  # [B, C]
      means = per_channel.reshape(batch, self.num_groups, per_group).sum(-1) / count  # [B, G]
      return jnp.repeat(means, per_group, axis=-1).reshape(broadcast)

    mean = group_mean(x)
    var = jnp.maximum(group_mean(x * x) - mean * mean, 0.0)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)  # [B, 1.., C]
    y = x * mul + (bias.astype(jnp.float32) - mean * mul)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32 (`layer_norm`), returned in `dtype`.

  Same parameters as nn.LayerNorm (a child "norm" holding "scale" and "bias") and the same
  statistics; its gradient keeps less memory (`kernels.layer_norm`).
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale, bias = _ScaleBias(x.shape[-1], self.param_dtype, name="norm")()
    f32 = lambda a: a.astype(jnp.float32)
    return kernels.layer_norm(f32(x), f32(scale), f32(bias), self.epsilon).astype(self.dtype)


class Conv(nn.Module):
  """A 2D NHWC conv with nn.Conv's parameters (`kernel` [kh, kw, Cin, F], `bias` [F]) and init.

  When the kernel is larger than the (unpadded) feature map and the stride is 1, it is computed
  as im2col + one matmul: XLA's CPU backend rewrites such a convolution into a form that misses
  its fast kernels (a 3x3 conv on LPIPS's 2x2 last-VGG-block maps at 32 px is about 100x slower
  than the matmul; see benchmarks/README.md, 2026-11-22). Same function, different summation order.

  `upsample_first` makes it conv(nearest_x2(x)) (the Upsample block, `kernels.upsample_conv`).
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  upsample_first: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.upsample_first:
      padded_3x3 = (self.kernel_size == (3, 3) and self.strides == (1, 1)
                    and self.padding == ((1, 1), (1, 1)))
      y = kernels.upsample_conv(x, kernel, self._conv, padded_3x3=padded_3x3)  # [B, 2H, 2W, F]
    else:
      y = self._conv(x, kernel)  # [B, OH, OW, F]
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y  # [B, OH, OW, F]

  def _conv(self, x, kernel):
    kh, kw = self.kernel_size
    b, h, w, c = x.shape
    if self.strides == (1, 1) and (kh > h or kw > w):
      (pt, pb), (pl, pr) = self.padding
      xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # [B, H+pt+pb, W+pl+pr, C]
      oh, ow = h + pt + pb - kh + 1, w + pl + pr - kw + 1
      cols = jnp.concatenate([xp[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)],
                             axis=-1)  # [B, OH, OW, kh*kw*C], (i, j, c) order as the kernel
      return cols @ kernel.reshape(kh * kw * c, self.features)  # [B, OH, OW, F]
    return jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None, *,
         dtype: Dtype, param_dtype: Dtype, upsample_first: bool = False,
         name: Optional[str] = None) -> Conv:
  """A 2D conv with torch-style symmetric padding (kernel // 2 on every side by default)."""
  pad = kernel // 2 if padding is None else padding
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), upsample_first=upsample_first, dtype=dtype,
              param_dtype=param_dtype, name=name)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then an optional 3x3 conv (UNet and autoencoder alike)."""
  features: int
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.use_conv:
      return kernels.nearest_x2(x)  # [B, 2H, 2W, C]
    return conv(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                upsample_first=True, name="conv")(x)  # [B, 2H, 2W, C']


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv, or 2x2 average pooling when use_conv is False.

  style "unet": padding 1 on every side (openaimodel.Downsample).
  style "autoencoder": pad right/bottom by one, then a VALID conv (taming / ldm autoencoders).
  Flax's 'SAME' padding pads (0, 1) for a stride-2 3x3 conv, which matches neither, so padding is
  always explicit here.
  """
  features: int
  use_conv: bool = True
  style: str = "unet"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.use_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.style == "unet":
      padding = ((1, 1), (1, 1))
    elif self.style == "autoencoder":
      padding = ((0, 1), (0, 1))
    else:
      raise ValueError(f"Downsample.style={self.style!r}; expected 'unet' or 'autoencoder'.")
    return nn.Conv(self.features, (3, 3), strides=(2, 2), padding=padding, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="op")(x)  # [B, H/2, W/2, C']


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in openaimodel.

  Args:
    t: [B] timesteps.
    dim: embedding width (the UNet's model_channels).
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None]  # [B, half]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, 2*half]
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb
