"""Building blocks shared by the autoencoder, the UNet and the text encoders.

Everything is NHWC. Each layer takes `dtype` (compute) and `param_dtype` (storage); normalisation
statistics and softmax always run in float32 whatever the compute dtype, as in the original models
(their `GroupNorm32` upcasts, and attention softmax is taken in fp32).
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import remat

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
  [B, H, W, G, C / G] (kl-f8 decode at 256 px: 0.80x -> 0.91x torch; benchmarks/README.md).

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


def _layer_norm_stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Per-row mean and 1 / std over the last axis (nn.LayerNorm's fast variance, clipped at 0)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis.

  Differentiating it keeps only the normalised input and the per-row 1 / std (what torch's
  LayerNorm keeps); JAX's own derivative of the same expression keeps four full-size
  intermediates (x^2, x - mean, their product with 1 / std, the output). Reverse mode only, as
  any custom VJP (jax.jvp through it raises).
  """
  mean, rstd = _layer_norm_stats(x, epsilon)
  return (x - mean) * rstd * scale + bias


def _layer_norm_fwd(x, scale, bias, epsilon):
  mean, rstd = _layer_norm_stats(x, epsilon)
  normed = (x - mean) * rstd
  return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, ct):
  del epsilon  # only through rstd
  normed, rstd, scale = residuals
  rows = tuple(range(ct.ndim - 1))
  ct_normed = ct * scale
  ct_x = rstd * (ct_normed - jnp.mean(ct_normed, axis=-1, keepdims=True)
                 - normed * jnp.mean(ct_normed * normed, axis=-1, keepdims=True))
  return ct_x, jnp.sum(ct * normed, axis=rows), jnp.sum(ct, axis=rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32 (`layer_norm`), returned in `dtype`.

  Same parameters as nn.LayerNorm (a child "norm" holding "scale" and "bias") and the same
  statistics; its gradient keeps less memory (UNet train step at batch 8: -65 MiB of XLA temp).
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale, bias = _ScaleBias(x.shape[-1], self.param_dtype, name="norm")()
    f32 = lambda a: a.astype(jnp.float32)
    return layer_norm(f32(x), f32(scale), f32(bias), self.epsilon).astype(self.dtype)


class Conv(nn.Module):
  """A 2D NHWC conv with nn.Conv's parameters (`kernel` [kh, kw, Cin, F], `bias` [F]) and init.

  When the kernel is larger than the (unpadded) feature map and the stride is 1, it is computed
  as im2col + one matmul: XLA's CPU backend rewrites such a convolution into a form that misses
  its fast kernels (a 3x3 conv on LPIPS's 2x2 last-VGG-block maps at 32 px ran ~100x slower than
  the matmul; benchmarks/README.md). Same function, different summation order.

  `upsample_first` makes it conv(nearest_x2(x)) (the Upsample block); see `upsample_conv3x3`
  for how that is computed on CPU.
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
    phased = (self.upsample_first and self.kernel_size == (3, 3) and self.strides == (1, 1)
              and self.padding == ((1, 1), (1, 1)) and jax.default_backend() == "cpu"
              and x.shape[1] * x.shape[2] >= CPU_PHASED_UPSAMPLE_MIN)
    if phased:
      y = upsample_conv3x3(x, kernel)  # [B, 2H, 2W, F]
    else:
      y = self._conv(nearest_x2(x) if self.upsample_first else x, kernel)  # [B, OH, OW, F]
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


def nearest_x2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2 x 2 (torch's 'nearest' x2)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


# On CPU, Conv(upsample_first=True) with a 3x3 kernel on inputs of at least this many positions
# uses `upsample_conv3x3`; below it the extra interleave costs more than the FLOPs saved
# (measured on 2 Xeon cores: 8x8 / 16x16 inputs 2.8 / 9.3 ms plain vs 9.0 / 12.1 phased;
# 32x32x512 177 vs 122 ms; 128x128x256 1108 vs 333 ms, torch 649 ms).
CPU_PHASED_UPSAMPLE_MIN = 32 * 32

# Each output phase a of nearest-x2-then-3x3 sees the input rows (i - 1 + a, i + a) through the
# kernel rows summed as below: phase 0 gets (k0, k1 + k2), phase 1 gets (k0 + k1, k2).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)  # [a, tap, k]


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv3x3(nearest_x2(x)) with padding 1 and no bias, in 2.25x fewer FLOPs.

  Output pixel (2i + a, 2j + b) of the upsampled conv only ever sees 2 x 2 distinct input
  pixels, so each of the four phases (a, b) is a 2x2 conv of x with kernel taps summed
  (`_PHASE_TAPS`). All four run as one 2x2 VALID conv of the 1-padded input with 4F output
  channels; phase (a, b) is its output shifted by (a, b), and the phases are interleaved back.
  Exact up to the summation order (tests/models/test_layers_fast_paths.py).

  Args:
    x: [B, H, W, C]; kernel: [3, 3, C, F].
  Returns:
    [B, 2H, 2W, F].
  """
  b, h, w, c = x.shape
  f = kernel.shape[-1]
  taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
  phase_kernel = jnp.einsum("aru,bsv,uvcf->rscabf", taps, taps, kernel).reshape(2, 2, c, 4 * f)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H+2, W+2, C]
  out = jax.lax.conv_general_dilated(xp, phase_kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out = out.reshape(b, h + 1, w + 1, 2, 2, f)  # [B, H+1, W+1, a, b, F]
  rows = [jnp.stack([out[:, a:a + h, s:s + w, a, s] for s in range(2)], axis=3)
          for a in range(2)]  # a: [B, H, W, 2 (b), F]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, f)  # [B, H, a, W, b, F] -> [B, 2H, 2W, F]


class Upsample(nn.Module):
  """Nearest-neighbour x2, then an optional 3x3 conv (UNet and autoencoder alike)."""
  features: int
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.use_conv:
      return nearest_x2(x)  # [B, 2H, 2W, C]
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


# On CPU, attention whose logits exceed CPU_ATTENTION_UNBLOCKED elements (32 MiB in float32) is
# computed block by block inside a serial loop, each block holding at most CPU_ATTENTION_BLOCK
# logits (4 MiB). A block is one or more (batch, head) pairs with all their queries, or, when one
# pair's [Lq, Lk] logits exceed the budget, a slice of one pair's queries; each block is then a
# plain matmul -> softmax -> matmul whose logits stay in cache. Measured on 2 idle Xeon cores for
# the issue-#8 UNet's 32x32 self-attention (1024 tokens, 8 heads of 8 channels, 16 / 64 MiB of
# logits at batch 2 / 8): unblocked 53 / 234 ms, query blocks across all pairs (2**21 elements)
# 16 / 67 ms, one pair per block 14.6 / 52 ms (torch's fused SDPA 11 / 31 ms). Smaller problems
# (its cross-attention, 1024 x 77 tokens, 5 M logits at batch 8: 7.1 ms unblocked, 7.5 ms in
# blocks, torch 11 ms) gain nothing from the serial loop. Each query row's softmax still spans all
# keys, so the function is unchanged; only the loop order differs. Set CPU_ATTENTION_BLOCK to None
# to switch blocking off.
#
# The backward pass (a custom VJP, flash-attention style: it recomputes the softmax weights from
# q, k and each query's log-sum-exp) always runs in blocks of at most CPU_ATTENTION_GRAD_BLOCK
# logits on CPU: it makes five passes over each block, so cache locality pays off at every size.
# Forward + backward at batch 8 on 2 AMD EPYC cores: the cross-attention (1024 x 77) 58 ms with
# the backward in one block, 31 ms in 2**19-logit blocks (JAX's own derivative of the softmax,
# keeping the weights: 36-40 ms); the 32x32 self-attention 132-140 ms at 2**18..2**20 (the
# earlier checkpointed forward blocks: 275 ms).
CPU_ATTENTION_BLOCK = 2 ** 20
CPU_ATTENTION_UNBLOCKED = 2 ** 23
CPU_ATTENTION_GRAD_BLOCK = 2 ** 19


def attention_blocks(pairs: int, lq: int, lk: int, budget: int | None) -> tuple[int, int]:
  """How to split `pairs` (batch x heads) [Lq, Lk] logit matrices into blocks of <= budget.

  Returns (pairs per block, queries per block), both divisors of their totals: as many whole
  pairs as fit, else one pair and the most queries that fit (one query per block if Lq has no
  fitting divisor). budget None means one block.
  """
  if budget is None or pairs * lq * lk <= budget:
    return pairs, lq
  if lq * lk <= budget:
    return max(g for g in range(1, pairs + 1) if pairs % g == 0 and g * lq * lk <= budget), lq
  fitting = [c for c in range(1, lq + 1) if lq % c == 0 and c * lk <= budget]
  return 1, max(fitting, default=1)


def auto_block_budget(logits: int) -> int | None:
  """CPU_ATTENTION_BLOCK on CPU for more than CPU_ATTENTION_UNBLOCKED logits; else None (one
  block): on GPU / TPU a serial loop would idle the device, and fused kernels already avoid the
  round trip to memory."""
  if jax.default_backend() != "cpu" or logits <= CPU_ATTENTION_UNBLOCKED:
    return None
  return CPU_ATTENTION_BLOCK


def auto_grad_block_budget() -> int | None:
  """CPU_ATTENTION_GRAD_BLOCK on CPU, else None: the block size of attention's backward pass."""
  return CPU_ATTENTION_GRAD_BLOCK if jax.default_backend() == "cpu" else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              mask: jax.Array | None = None, block_budget: int | None | str = "auto") -> jax.Array:
  """Multi-head scaled dot-product attention with the softmax in float32.

  Differentiated as flash attention is: the backward pass keeps q, k, v, the output and each
  query's log-sum-exp, and recomputes the softmax weights block by block, rather than keeping
  [B, heads, Lq, Lk] weights between the passes (issue-#8 UNet train step at batch 8 on CPU:
  XLA temp 1172 -> 1005 MiB, step 3491 -> 2653 ms). Reverse mode only, as any custom VJP.

  Args:
    q: [B, Lq, heads, d]; k, v: [B, Lk, heads, d].
    scale: multiplier of q.k (default d ** -0.5).
    mask: optional boolean, broadcastable to [B, heads, Lq, Lk]; True = attend.
    block_budget: largest logits block in elements, forward and backward ("auto": the forward
      in CPU_ATTENTION_BLOCK blocks on CPU when the logits exceed CPU_ATTENTION_UNBLOCKED, the
      backward in CPU_ATTENTION_GRAD_BLOCK blocks on CPU; no blocking elsewhere; None: never
      block). Masked attention is never blocked.
  Returns:
    [B, Lq, heads, d] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  b, lq, heads, d = q.shape
  lk = k.shape[1]
  pairs = b * heads
  if mask is not None:
    blocks = grad_blocks = (pairs, lq)
  elif block_budget == "auto":
    blocks = attention_blocks(pairs, lq, lk, auto_block_budget(pairs * lq * lk))
    grad_blocks = attention_blocks(pairs, lq, lk, auto_grad_block_budget())
  else:
    blocks = grad_blocks = attention_blocks(pairs, lq, lk, block_budget)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, L, d] each
  out = _attention(float(scale), blocks, grad_blocks, q, k, v, mask)  # [B, heads, Lq, d]
  return out.transpose(0, 2, 1, 3)  # [B, Lq, heads, d]


def _logits(scale, qb, kb, mask_b):
  """[..., c, Lk] float32 logits of one block; scaling q touches [c, d], not [c, Lk]."""
  logits = jnp.einsum("...qd,...kd->...qk", qb * jnp.asarray(scale, qb.dtype), kb,
                      preferred_element_type=jnp.float32)
  if mask_b is not None:
    logits = jnp.where(mask_b, logits, jnp.finfo(jnp.float32).min)
  return logits


def _block_forward(scale, qb, kb, vb, mask_b):
  """softmax(q.k) @ v of one block, and each query's log-sum-exp [..., c] (float32).

  The division by the softmax total comes after the product with v: it then scales [c, d]
  instead of [c, Lk] elements (one pass less over the largest array).
  """
  logits = _logits(scale, qb, kb, mask_b)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)  # [..., c, Lk], unnormalised
  total = jnp.sum(weights, axis=-1, keepdims=True)  # [..., c, 1]
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(vb.dtype), vb,
                   preferred_element_type=jnp.float32)
  return (out / total).astype(vb.dtype), (peak + jnp.log(total))[..., 0]


def _block_backward(scale, qb, kb, vb, mask_b, ob, lse_b, dob):
  """Gradients of one block from recomputed softmax weights, in float32.

  Returns dq [..., c, d] and the transposed dk, dv [..., d, Lk]. The products that contract over
  queries are taken as x^T [d, c] @ [c, Lk], transposing the small [c, d] operand: XLA:CPU
  transposes the [c, Lk] operand of w^T @ dout (or contracts its major dimension) far more slowly
  (the issue-#8 UNet's 32x32 self-attention backward at batch 8, blocks of 256 x 1024: 100 ms
  this way, 430-460 ms either other way).
  """
  weights = jnp.exp(_logits(scale, qb, kb, mask_b) - lse_b[..., None])  # [..., c, Lk], softmax
  dvt = jnp.einsum("...dq,...qk->...dk", jnp.swapaxes(dob, -1, -2), weights.astype(dob.dtype),
                   preferred_element_type=jnp.float32)
  dweights = jnp.einsum("...qd,...kd->...qk", dob, vb, preferred_element_type=jnp.float32)
  # Softmax's Jacobian: dlogits = w * (dw - sum_k w dw), and sum_k w dw = dout . out per query.
  row = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1, keepdims=True)
  dlogits = weights * (dweights - row)
  if mask_b is not None:
    dlogits = jnp.where(mask_b, dlogits, 0)
  dlogits = dlogits.astype(qb.dtype)
  dq = jnp.einsum("...qk,...kd->...qd", dlogits, kb, preferred_element_type=jnp.float32) * scale
  dkt = jnp.einsum("...dq,...qk->...dk", jnp.swapaxes(qb * jnp.asarray(scale, qb.dtype), -1, -2),
                   dlogits, preferred_element_type=jnp.float32)
  return dq, dkt, dvt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(scale, blocks, grad_blocks, q, k, v, mask):
  return _attention_forward(scale, blocks, q, k, v, mask)[0]


def _attention_forward(scale, blocks, q, k, v, mask):
  """Output [B, heads, Lq, d] and log-sum-exp [B, heads, Lq] in `blocks` (pairs, queries) blocks."""
  b, heads, lq, d = q.shape
  lk = k.shape[2]
  group, chunk = blocks
  if group == b * heads and chunk == lq:
    return _block_forward(scale, q, k, v, mask)
  n_groups, n_chunks = b * heads // group, lq // chunk
  qs = q.reshape(n_groups, group, n_chunks, chunk, d)
  ks, vs = (x.reshape(n_groups, group, lk, d) for x in (k, v))

  def step(i):  # block i: pair group i // n_chunks, query chunk i % n_chunks
    g, c = i // n_chunks, i % n_chunks
    return _block_forward(scale, qs[g, :, c], ks[g], vs[g], None)

  out, lse = jax.lax.map(step, jnp.arange(n_groups * n_chunks))  # [blocks, group, chunk, ...]
  out = out.reshape(n_groups, n_chunks, group, chunk, d).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(n_groups, n_chunks, group, chunk).transpose(0, 2, 1, 3)
  return out.reshape(b, heads, lq, d), lse.reshape(b, heads, lq)


def _attention_fwd(scale, blocks, grad_blocks, q, k, v, mask):
  out, lse = _attention_forward(scale, blocks, q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, blocks, grad_blocks, residuals, dout):
  q, k, v, mask, out, lse = residuals
  # Tied to the cotangent, or XLA:CPU merges the recomputed logits with the forward's and keeps
  # them alive between the passes.
  q, k = remat.after_cotangent(dout, (q, k))
  b, heads, lq, d = q.shape
  lk = k.shape[2]
  group, chunk = grad_blocks
  if group == b * heads and chunk == lq:
    dq, dkt, dvt = _block_backward(scale, q, k, v, mask, out, lse, dout)
    grads = dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)
  else:
    n_groups, n_chunks = b * heads // group, lq // chunk
    per_query = [x.reshape(n_groups, group, n_chunks, chunk, *x.shape[3:])
                 for x in (q, out, lse, dout)]
    ks, vs = (x.reshape(n_groups, group, lk, d) for x in (k, v))

    def pair_group(xs):  # one group's gradients, summing dk / dv over its query chunks
      kg, vg, *per_query_g = xs  # [group, Lk, d] x 2, then [group, chunks, chunk, ...] each

      def chunk_step(carry, c):
        qc, oc, lse_c, doc = (x[:, c] for x in per_query_g)
        dq, dkt, dvt = _block_backward(scale, qc, kg, vg, None, oc, lse_c, doc)
        return (carry[0] + dkt, carry[1] + dvt), dq

      zeros = jnp.zeros((group, d, lk), jnp.float32)
      (dkt, dvt), dq = jax.lax.scan(chunk_step, (zeros, zeros), jnp.arange(n_chunks))
      return dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)  # dq: [chunks, group, ...]

    dq, dk, dv = jax.lax.map(pair_group, (ks, vs, *per_query))
    dq = dq.transpose(0, 2, 1, 3, 4)  # [groups, group, chunks, chunk, d]
    grads = (dq.reshape(b, heads, lq, d), dk.reshape(b, heads, lk, d), dv.reshape(b, heads, lk, d))
  dq, dk, dv = (g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
