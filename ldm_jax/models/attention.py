"""Attention blocks of the latent-diffusion UNet (CompVis `ldm/modules/attention.py`, openaimodel).

  * `CrossAttention`: multi-head attention, to_q/to_k/to_v without bias, to_out with bias.
  * `FeedForward`: the GEGLU feed-forward (Dense to 2 x 4d split as (value, gate), exact-erf GELU;
    `kernels.geglu` keeps only its inputs for the backward pass).
  * `BasicTransformerBlock`: x += attn1(LN x); x += attn2(LN x, context); x += ff(LN x).
  * `SpatialTransformer`: GroupNorm (eps 1e-6), proj_in, `depth` transformer blocks over the
    row-major (h, w) tokens, proj_out, residual.
  * `AttentionBlock`: the legacy (non-transformer) self-attention block with one fused qkv
    projection laid out per head as [h0: q, k, v | h1: q, k, v | ...].

Everything is NHWC / [B, L, C]. proj_in / proj_out and the legacy qkv / proj_out are 1x1
convolutions in some checkpoints and Linear layers in others; a 1x1 conv is the same map as a Dense
over channels, so they are Dense here and the importers reshape the kernels. Softmax runs in float32
(`kernels.attention`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax import kernels
from ldm_jax.models import layers

Dtype = Any


class CrossAttention(nn.Module):
  """Multi-head attention of x over context (self-attention when context is None)."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    """x: [B, L, C]; context: [B, M, D] or None. Returns [B, L, C]."""
    b, length, channels = x.shape
    context = x if context is None else context
    inner = self.heads * self.dim_head
    dense = lambda features, name, bias=False: nn.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = dense(inner, "to_q")(x).reshape(b, length, self.heads, self.dim_head)  # [B, L, h, d]
    k = dense(inner, "to_k")(context).reshape(b, -1, self.heads, self.dim_head)  # [B, M, h, d]
    v = dense(inner, "to_v")(context).reshape(b, -1, self.heads, self.dim_head)  # [B, M, h, d]
    out = kernels.attention(q, k, v, scale=self.dim_head ** -0.5)  # [B, L, h, d]
    return dense(channels, "to_out", bias=True)(out.reshape(b, length, inner))  # [B, L, C]


class _DenseParams(nn.Module):
  """nn.Dense's parameters (same names, shapes and initialisers), for a Dense applied in parts."""
  features_in: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.features_in, self.features), self.param_dtype)
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)


class FeedForward(nn.Module):
  """GEGLU feed-forward: Dense(C -> 2 * mult * C), value * gelu(gate), Dense(mult * C -> C).

  The first Dense ("proj", kernel [C, 2 * inner]) is applied as two matmuls with the value and
  gate halves of its kernel: the same function as one Dense followed by a split, without the
  [B, L, 2 * inner] concatenation the split costs in the backward pass (see benchmarks/README.md,
  2026-11-22, commit 34c6112).
  """
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    inner = self.mult * channels
    kernel, bias = _DenseParams(channels, 2 * inner, self.param_dtype, name="proj")()
    kernel, bias, x = (a.astype(self.dtype) for a in (kernel, bias, x))
    # (value, gate) order, as torch's chunk(2) of the projection.
    value = x @ kernel[:, :inner] + bias[:inner]  # [B, L, inner]
    gate = x @ kernel[:, inner:] + bias[inner:]  # [B, L, inner]
    h = kernels.geglu(value, gate)  # [B, L, inner]
    return nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and feed-forward, each pre-LayerNorm (eps 1e-5) and residual.

  With disable_self_attn the first attention also attends to the context (CompVis
  `disable_self_attn`, diffusers `only_cross_attention`).
  """
  heads: int
  dim_head: int
  disable_self_attn: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    """x: [B, L, C]; context: [B, M, D] or None. Returns [B, L, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: CrossAttention(self.heads, self.dim_head, name=name, **kw)
    norm = lambda name: layers.LayerNorm(epsilon=1e-5, name=name, **kw)
    x = x + attn("attn1")(norm("norm1")(x), context if self.disable_self_attn else None)
    x = x + attn("attn2")(norm("norm2")(x), context)
    x = x + FeedForward(name="ff", **kw)(norm("norm3")(x))
    return x  # [B, L, C]


class SpatialTransformer(nn.Module):
  """Transformer over the pixels of a feature map, conditioned on a context sequence."""
  heads: int
  dim_head: int
  depth: int = 1
  disable_self_attn: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    """x: [B, H, W, C]; context: [B, M, D] or None. Returns [B, H, W, C]."""
    b, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # This GroupNorm uses eps 1e-6 (the ldm `Normalize`), unlike the UNet's other norms (1e-5).
    h = layers.GroupNorm(epsilon=1e-6, name="norm", **kw)(x)
    h = h.reshape(b, height * width, channels)  # [B, HW, C], row-major tokens
    h = nn.Dense(inner, name="proj_in", **kw)(h)  # [B, HW, inner]
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, self.dim_head, self.disable_self_attn,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    h = nn.Dense(channels, name="proj_out", **kw)(h)  # [B, HW, C]
    return x + h.reshape(b, height, width, channels)


class AttentionBlock(nn.Module):
  """Legacy self-attention block (openaimodel.AttentionBlock with QKVAttentionLegacy).

  The fused qkv output is laid out per head, [h0: q, k, v | h1: q, k, v | ...], so checkpoints load
  without reordering. The original scales q and k by ch^-1/4 each; one ch^-1/2 on q.k is the same.
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C]. Returns [B, H, W, C]."""
    b, height, width, channels = x.shape
    ch = channels // self.heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.GroupNorm(epsilon=1e-5, name="norm", **kw)(x).reshape(b, height * width, channels)
    qkv = nn.Dense(3 * channels, name="qkv", **kw)(h)  # [B, HW, 3C]
    qkv = qkv.reshape(b, height * width, self.heads, 3, ch)  # [B, HW, heads, (q|k|v), ch]
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # each [B, HW, heads, ch]
    out = kernels.attention(q, k, v, scale=ch ** -0.5).reshape(b, height * width, channels)
    # Heads are concatenated head-major on channels, as the original's reshape does.
    out = nn.Dense(channels, name="proj_out", **kw)(out)  # [B, HW, C]
    return x + out.reshape(b, height, width, channels)
