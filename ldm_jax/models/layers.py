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

Dtype = Any


class GroupNorm(nn.Module):
  """GroupNorm computed in float32, returned in the compute dtype.

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
    y = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name="norm")(x.astype(jnp.float32))
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (transformer blocks use eps 1e-5)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=self.param_dtype,
                     name="norm")(x.astype(jnp.float32))
    return y.astype(self.dtype)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None, *,
         dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None) -> nn.Conv:
  """A 2D conv with torch-style symmetric padding (kernel // 2 on every side by default)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype, name=name)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then an optional 3x3 conv (UNet and autoencoder alike)."""
  features: int
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    if self.use_conv:
      x = conv(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    return x  # [B, 2H, 2W, C']


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              mask: jax.Array | None = None) -> jax.Array:
  """Multi-head scaled dot-product attention with the softmax in float32.

  Args:
    q: [B, Lq, heads, d]; k, v: [B, Lk, heads, d].
    scale: multiplier of q.k (default d ** -0.5).
    mask: optional boolean, broadcastable to [B, heads, Lq, Lk]; True = attend.
  Returns:
    [B, Lq, heads, d] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, heads, Lq, Lk]
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
