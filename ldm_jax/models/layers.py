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


class Conv(nn.Module):
  """A 2D NHWC conv with nn.Conv's parameters (`kernel` [kh, kw, Cin, F], `bias` [F]) and init.

  When the kernel is larger than the (unpadded) feature map and the stride is 1, it is computed
  as im2col + one matmul: XLA's CPU backend rewrites such a convolution into a form that misses
  its fast kernels (a 3x3 conv on LPIPS's 2x2 last-VGG-block maps at 32 px ran ~100x slower than
  the matmul; benchmarks/README.md). Same function, different summation order.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    b, h, w, c = x.shape
    if self.strides == (1, 1) and (kh > h or kw > w):
      (pt, pb), (pl, pr) = self.padding
      xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # [B, H+pt+pb, W+pl+pr, C]
      oh, ow = h + pt + pb - kh + 1, w + pl + pr - kw + 1
      cols = jnp.concatenate([xp[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)],
                             axis=-1)  # [B, OH, OW, kh*kw*C], (i, j, c) order as the kernel
      y = cols @ kernel.reshape(kh * kw * c, self.features)  # [B, OH, OW, F]
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y  # [B, OH, OW, F]


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None, *,
         dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None) -> Conv:
  """A 2D conv with torch-style symmetric padding (kernel // 2 on every side by default)."""
  pad = kernel // 2 if padding is None else padding
  return Conv(features, (kernel, kernel), strides=(stride, stride),
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


# On CPU, attention logits are computed in blocks of queries of at most this many elements (1 MiB
# in float32, inside one core's L2 cache, 2 MiB on the Xeons measured): the softmax passes then
# read cached data instead of a [B, heads, Lq, Lk] array from DRAM. At the issue-#8 UNet's 32x32
# level (1024 tokens, 8 heads, batch 2) self-attention took 50 ms against 89 ms unblocked on one
# contended core (4 MiB blocks: 72 ms). Each query row's softmax still spans all keys, so the
# function is unchanged; only the loop order differs. Set to None to switch blocking off.
CPU_ATTENTION_BLOCK = 2 ** 18


def query_blocks(batch: int, heads: int, lq: int, lk: int, budget: int | None) -> int:
  """The fewest equal query blocks whose logits [B, heads, Lq / n, Lk] fit in `budget` elements.

  budget None means no blocking (1). Lq with no fitting divisor falls back to one query per block.
  """
  if budget is None or batch * heads * lq * lk <= budget:
    return 1
  for n in range(2, lq + 1):
    if lq % n == 0 and batch * heads * (lq // n) * lk <= budget:
      return n
  return lq


def _default_block_budget() -> int | None:
  """CPU_ATTENTION_BLOCK on CPU; None (one block) on GPU / TPU, where a serial loop would idle
  the device and fused attention kernels already avoid the round trip to memory."""
  return CPU_ATTENTION_BLOCK if jax.default_backend() == "cpu" else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              mask: jax.Array | None = None, block_budget: int | None | str = "auto") -> jax.Array:
  """Multi-head scaled dot-product attention with the softmax in float32.

  Args:
    q: [B, Lq, heads, d]; k, v: [B, Lk, heads, d].
    scale: multiplier of q.k (default d ** -0.5).
    mask: optional boolean, broadcastable to [B, heads, Lq, Lk]; True = attend.
    block_budget: largest logits block in elements ("auto": CPU_ATTENTION_BLOCK on CPU, no
      blocking elsewhere; None: never block). Masked attention is never blocked.
  Returns:
    [B, Lq, heads, d] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  b, lq, heads, d = q.shape
  budget = _default_block_budget() if block_budget == "auto" else block_budget
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, L, d] each

  def block(qb, mask_b):  # qb [B, heads, c, d]
    logits = jnp.einsum("bhqd,bhkd->bhqk", qb, k, preferred_element_type=jnp.float32) * scale
    if mask_b is not None:
      logits = jnp.where(mask_b, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, heads, c, Lk]
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)  # [B, heads, c, d]

  n = 1 if mask is not None else query_blocks(b, heads, lq, k.shape[2], budget)
  if n == 1:
    out = block(q, mask)  # [B, heads, Lq, d]
  else:
    blocks = q.reshape(b, heads, n, lq // n, d).transpose(2, 0, 1, 3, 4)  # [n, B, heads, c, d]
    out = jax.lax.map(lambda qb: block(qb, None), blocks)  # [n, B, heads, c, d]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, heads, lq, d)  # [B, heads, Lq, d]
  return out.transpose(0, 2, 1, 3)  # [B, Lq, heads, d]
