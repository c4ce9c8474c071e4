"""Encoder and Decoder of the first-stage autoencoders (CompVis diffusionmodules/model.py).

The same convolutional trunk serves the KL and the VQ autoencoders; `autoencoder.py` adds the
latent bottleneck. Parameter names follow the CompVis module tree flattened with underscores
(`down.1.block.0` -> `down_1_block_0`, `mid.attn_1` -> `mid_attn_1`), so that importing a
checkpoint is a rename plus a layout transform (see `ldm_jax/convert/autoencoder.py`).

Everything is NHWC. GroupNorm uses 32 groups and eps 1e-6, computed in float32 (layers.GroupNorm).
`attn_resolutions` are *pixel* resolutions: a level whose feature map is `r` pixels wide (with
`resolution` the nominal input size) gets attention after each ResnetBlock when `r` is listed.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax import kernels
from ldm_jax.models import layers
from ldm_jax.models import remat as remat_lib

Dtype = Any

GN_EPS = 1e-6  # every autoencoder GroupNorm (CompVis `Normalize`)
ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")  # vanilla-xformers computes the same function


def _check_attn_type(attn_type: str, owner: str):
  if attn_type not in ATTN_TYPES:
    raise ValueError(f"{owner}.attn_type={attn_type!r}; expected one of {ATTN_TYPES} "
                     "('linear' and cross-attention variants are not implemented).")


class ResnetBlock(nn.Module):
  """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1-projected) skip.

  The autoencoder blocks have no timestep embedding (temb_channels = 0 in CompVis).
  """
  out_channels: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.GroupNorm(GN_EPS, self.num_groups, name="norm1", **kw)(x)
    h = nn.swish(h)
    h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)  # [B, H, W, Cout]
    h = layers.GroupNorm(GN_EPS, self.num_groups, name="norm2", **kw)(h)
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = layers.conv(self.out_channels, 3, name="conv2", **kw)(h)  # [B, H, W, Cout]
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)  # [B, H, W, Cout]
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions with 1x1-conv q, k, v and proj_out."""
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic  # no dropout here; the argument keeps the block interface uniform
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = layers.GroupNorm(GN_EPS, self.num_groups, name="norm", **kw)(x)
    q = layers.conv(c, 1, name="q", **kw)(y).reshape(b, h * w, 1, c)  # [B, HW, 1, C]
    k = layers.conv(c, 1, name="k", **kw)(y).reshape(b, h * w, 1, c)  # [B, HW, 1, C]
    v = layers.conv(c, 1, name="v", **kw)(y).reshape(b, h * w, 1, c)  # [B, HW, 1, C]
    # One head of width C, so the default scale d^-0.5 is CompVis's int(c)**(-0.5).
    o = kernels.attention(q, k, v).reshape(b, h, w, c)  # [B, H, W, C]
    return x + layers.conv(c, 1, name="proj_out", **kw)(o)


def _block_runner(remat: bool, stochastic: bool, deterministic: bool):
  """(block, h) -> block(h, deterministic), rematerialised when asked (same params and outputs)."""
  if not remat:
    return lambda block, h: block(h, deterministic)
  return lambda block, h: remat_lib.recompute(
      lambda m, h: m(h, deterministic), block, h, deterministic=deterministic or not stochastic)


class Encoder(nn.Module):
  """Image [B, H, W, in_channels] -> [B, H/f, W/f, (2 if double_z else 1) * z_channels].

  f = 2 ** (len(ch_mult) - 1). `out_ch` is accepted for ddconfig compatibility and unused, as in
  CompVis.
  """
  ch: int
  out_ch: int
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  in_channels: int
  resolution: int
  z_channels: int
  ch_mult: Sequence[int] = (1, 2, 4, 8)
  dropout: float = 0.0
  double_z: bool = True
  attn_type: str = "vanilla"
  resamp_with_conv: bool = True
  norm_num_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    _check_attn_type(self.attn_type, "Encoder")
    run = _block_runner(self.remat, self.dropout > 0, deterministic)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(dropout=self.dropout, num_groups=self.norm_num_groups, **kw)
    use_attn = self.attn_type != "none"
    levels = len(self.ch_mult)

    h = layers.conv(self.ch, 3, name="conv_in", **kw)(x.astype(self.dtype))  # [B, H, W, ch]
    curr_res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = run(ResnetBlock(self.ch * mult, name=f"down_{i}_block_{j}", **blk), h)
        if use_attn and curr_res in self.attn_resolutions:
          h = run(AttnBlock(self.norm_num_groups, name=f"down_{i}_attn_{j}", **kw), h)
      if i != levels - 1:
        h = layers.Downsample(h.shape[-1], use_conv=self.resamp_with_conv, style="autoencoder",
                              name=f"down_{i}_downsample", **kw)(h)  # [B, H/2, W/2, C]
        curr_res //= 2

    c = h.shape[-1]
    h = run(ResnetBlock(c, name="mid_block_1", **blk), h)
    if use_attn:
      h = run(AttnBlock(self.norm_num_groups, name="mid_attn_1", **kw), h)
    h = run(ResnetBlock(c, name="mid_block_2", **blk), h)

    h = layers.GroupNorm(GN_EPS, self.norm_num_groups, name="norm_out", **kw)(h)
    h = nn.swish(h)
    z_out = 2 * self.z_channels if self.double_z else self.z_channels
    return layers.conv(z_out, 3, name="conv_out", **kw)(h)  # [B, H/f, W/f, z_out]


class Decoder(nn.Module):
  """Latent [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch].

  `up_{i}_*` is resolution level i (0 = full resolution, which runs last), as CompVis indexes
  `decoder.up[i]`; each level has num_res_blocks + 1 ResnetBlocks. `in_channels` and `double_z`
  are accepted so that a whole ddconfig can be passed, and unused, as in CompVis.
  """
  ch: int
  out_ch: int
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  in_channels: int
  resolution: int
  z_channels: int
  ch_mult: Sequence[int] = (1, 2, 4, 8)
  dropout: float = 0.0
  double_z: bool = True
  attn_type: str = "vanilla"
  resamp_with_conv: bool = True
  tanh_out: bool = False
  norm_num_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic: bool = True):
    _check_attn_type(self.attn_type, "Decoder")
    run = _block_runner(self.remat, self.dropout > 0, deterministic)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(dropout=self.dropout, num_groups=self.norm_num_groups, **kw)
    use_attn = self.attn_type != "none"
    levels = len(self.ch_mult)

    block_in = self.ch * self.ch_mult[-1]
    curr_res = self.resolution // 2 ** (levels - 1)
    h = layers.conv(block_in, 3, name="conv_in", **kw)(z.astype(self.dtype))  # [B, h, w, C]

    h = run(ResnetBlock(block_in, name="mid_block_1", **blk), h)
    if use_attn:
      h = run(AttnBlock(self.norm_num_groups, name="mid_attn_1", **kw), h)
    h = run(ResnetBlock(block_in, name="mid_block_2", **blk), h)

    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = run(ResnetBlock(self.ch * self.ch_mult[i], name=f"up_{i}_block_{j}", **blk), h)
        if use_attn and curr_res in self.attn_resolutions:
          h = run(AttnBlock(self.norm_num_groups, name=f"up_{i}_attn_{j}", **kw), h)
      if i != 0:
        h = layers.Upsample(h.shape[-1], use_conv=self.resamp_with_conv,
                            name=f"up_{i}_upsample", **kw)(h)  # [B, 2h, 2w, C]
        curr_res *= 2

    h = layers.GroupNorm(GN_EPS, self.norm_num_groups, name="norm_out", **kw)(h)
    h = nn.swish(h)
    h = layers.conv(self.out_ch, 3, name="conv_out", **kw)(h)  # [B, H, W, out_ch]
    return jnp.tanh(h) if self.tanh_out else h

