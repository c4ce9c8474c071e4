"""The time-conditional UNet of latent diffusion (CompVis `openaimodel.UNetModel`, SD 2.x version).

NHWC. `UNetModel` maps (x_t [B, H, W, C], t [B], context, y) to a prediction
[B, H, W, out_channels]; diffusion math lives elsewhere. The block structure (which layer sits
where, its channels and heads) is computed once by `UNetModel.layout()`, which the forward pass and
the weight importers (`ldm_jax.convert.unet`) both walk, so the two cannot disagree.

Flax module names follow the CompVis checkpoint positions: `input_blocks_{n}_{m}`,
`middle_block_{m}`, `output_blocks_{n}_{m}` for torch `input_blocks.n.m` etc.; `time_embed_0/2`,
`label_emb*`, `out_norm`, `out_conv`.
"""

import dataclasses
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import attention as attention_lib
from ldm_jax.models import layers
from ldm_jax.models import remat as remat_lib

Dtype = Any
GROUPS = 32


class ResBlock(nn.Module):
  """Residual block conditioned on the time embedding, optionally resampling (resblock_updown).

  in: GN, SiLU, [resample], conv3x3; emb: SiLU, Dense to out (or 2*out for scale-shift);
  out: GN, [* (1 + scale) + shift], SiLU, dropout, conv3x3; skip: identity or 1x1 conv.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resample: Optional[str] = None  # None | 'up' | 'down'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, deterministic=True):
    """x: [B, H, W, C]; emb: [B, E]. Returns [B, H', W', out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.GroupNorm(epsilon=1e-5, name="in_norm", **kw)(x))
    if self.resample == "up":
      # Parameter-free nearest x2 of both branches (the original's Upsample(use_conv=False)).
      h = layers.Upsample(x.shape[-1], use_conv=False, **kw)(h)
      x = layers.Upsample(x.shape[-1], use_conv=False, **kw)(x)
    elif self.resample == "down":
      h = layers.Downsample(x.shape[-1], use_conv=False, **kw)(h)
      x = layers.Downsample(x.shape[-1], use_conv=False, **kw)(x)
    h = layers.conv(self.out_channels, 3, name="in_conv", **kw)(h)  # [B, H', W', out]
    scale_shift = 2 if self.use_scale_shift_norm else 1
    e = nn.Dense(scale_shift * self.out_channels, name="emb_proj", **kw)(nn.silu(emb))
    e = e[:, None, None, :].astype(h.dtype)  # [B, 1, 1, out or 2*out]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = layers.GroupNorm(epsilon=1e-5, name="out_norm", **kw)(h) * (1 + scale) + shift
    else:
      h = layers.GroupNorm(epsilon=1e-5, name="out_norm", **kw)(h + e)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = layers.conv(self.out_channels, 3, name="out_conv", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="skip", **kw)(x)
    return x + h  # [B, H', W', out]


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a UNet block, as placed by `UNetModel.layout()`.

  kind: 'conv_in' | 'res' | 'transformer' | 'attention' | 'down' | 'up' | 'down_res' | 'up_res'.
  stage: 'input' | 'middle' | 'output'; block / pos: the CompVis indices (input_blocks.block.pos);
  level: resolution level (0 = full latent resolution); index: position among the level's blocks
  (diffusers' resnets.index / attentions.index).
  """
  kind: str
  stage: str
  block: int
  pos: int
  level: int
  index: int
  channels: int  # output channels
  heads: int = 0
  disable_self_attn: bool = False

  @property
  def name(self) -> str:
    if self.stage == "middle":
      return f"middle_block_{self.pos}"
    return f"{self.stage}_blocks_{self.block}_{self.pos}"


def check_input(name: str, x, in_channels: int, levels: int) -> None:
  """A ValueError unless x is [B, H, W, in_channels] with H and W divisible by 2^(levels - 1)."""
  if x.ndim != 4 or x.shape[-1] != in_channels:
    raise ValueError(f"{name}: x has shape {x.shape}; expected [B, H, W, in_channels="
                     f"{in_channels}].")
  factor = 2 ** (levels - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"{name}: x is {x.shape[1]}x{x.shape[2]}; expected H and W divisible by "
                     f"{factor} for {levels} levels.")


class UNetModel(nn.Module):
  """openaimodel.UNetModel in Flax; field meanings as in the original (see its docstring).

  num_res_blocks and transformer_depth are ints or per-level tuples; attention_resolutions are
  downsample factors; num_classes is None, an int (nn.Embed), 'continuous' (Dense from a scalar) or
  'sequential' (Dense-SiLU-Dense from adm_in_channels features). remat wraps every ResBlock and
  attention block in `remat.recompute` (same outputs, less activation memory). The output is in
  `dtype`.
  """
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: Union[int, Sequence[int]]
  attention_resolutions: Sequence[int]
  dropout: float = 0.0
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_classes: Union[None, int, str] = None
  adm_in_channels: Optional[int] = None
  num_heads: int = -1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_spatial_transformer: bool = False
  transformer_depth: Union[int, Sequence[int]] = 1
  context_dim: Optional[int] = None
  use_linear_in_transformer: bool = False
  disable_self_attentions: Optional[Sequence[bool]] = None
  num_attention_blocks: Optional[Sequence[int]] = None
  disable_middle_self_attn: bool = False
  legacy: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # ---------------------------------------------------------------------------------------------
  # Structure
  # ---------------------------------------------------------------------------------------------
  def _per_level(self, field: str, value) -> tuple:
    levels = len(self.channel_mult)
    if isinstance(value, int):
      return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
      raise ValueError(f"UNetModel.{field}={value} has {len(value)} entries; expected an int "
                       f"or one entry per level of channel_mult={tuple(self.channel_mult)} "
                       f"({levels}).")
    return value

  def _heads(self, ch: int, upsample_block: bool) -> int:
    """Heads of an attention layer with ch channels, following openaimodel's rules."""
    if self.num_head_channels != -1:
      if self.num_head_channels <= 0 or ch % self.num_head_channels:
        raise ValueError(f"UNetModel.num_head_channels={self.num_head_channels} does not divide "
                         f"the {ch} channels of an attention layer; expected a divisor of {ch}.")
      return ch // self.num_head_channels
    heads = self.num_heads
    # Only the legacy AttentionBlock of the output blocks reads num_heads_upsample.
    if upsample_block and self.legacy and not self.use_spatial_transformer:
      heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    if heads <= 0 or ch % heads:
      field = "num_heads_upsample" if heads != self.num_heads else "num_heads"
      raise ValueError(f"UNetModel.{field}={heads} does not divide the {ch} channels of an "
                       f"attention layer; expected a positive divisor of {ch} (or set "
                       f"num_head_channels).")
    return heads

  def _validate(self):
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("UNetModel: num_heads=-1 and num_head_channels=-1; set one of them.")
    for level, mult in enumerate(self.channel_mult):
      if (self.model_channels * mult) % GROUPS:
        raise ValueError(f"UNetModel.model_channels={self.model_channels} x channel_mult[{level}]="
                         f"{mult} = {self.model_channels * mult} channels; expected a multiple of "
                         f"{GROUPS} (GroupNorm groups).")
    if self.use_spatial_transformer and self.context_dim is None:
      raise ValueError("UNetModel.context_dim=None with use_spatial_transformer=True; expected the "
                       "width of the cross-attention context.")
    if self.context_dim is not None and not self.use_spatial_transformer:
      raise ValueError(f"UNetModel.context_dim={self.context_dim} needs "
                       f"use_spatial_transformer=True.")
    nc = self.num_classes
    if not (nc is None or nc in ("continuous", "sequential") or (isinstance(nc, int) and nc > 0)):
      raise ValueError(f"UNetModel.num_classes={nc!r}; expected None, a positive int, "
                       f"'continuous' or 'sequential'.")
    if nc == "sequential" and not self.adm_in_channels:
      raise ValueError(f"UNetModel.adm_in_channels={self.adm_in_channels} with num_classes="
                       f"'sequential'; expected the width of the y vector.")
    self._per_level("transformer_depth", self.transformer_depth)
    if self.disable_self_attentions is not None:
      self._per_level("disable_self_attentions", tuple(self.disable_self_attentions))
    if self.num_attention_blocks is not None:
      nab = self._per_level("num_attention_blocks", tuple(self.num_attention_blocks))
      nrb = self._per_level("num_res_blocks", self.num_res_blocks)
      if any(a > r for a, r in zip(nab, nrb)):
        raise ValueError(f"UNetModel.num_attention_blocks={nab}; expected at most num_res_blocks="
                         f"{nrb} per level.")

  def layout(self) -> tuple[list[list[Layer]], list[Layer], list[list[Layer]]]:
    """(input_blocks, middle_block, output_blocks) as lists of `Layer`, in CompVis order."""
    self._validate()
    nrb = self._per_level("num_res_blocks", self.num_res_blocks)
    no_sa = (tuple(self.disable_self_attentions) if self.disable_self_attentions is not None
             else (False,) * len(self.channel_mult))
    attn_kind = "transformer" if self.use_spatial_transformer else "attention"

    def attn_layer(stage, block, level, index, ch):
      if (self.num_attention_blocks is not None and index >= self.num_attention_blocks[level]):
        return []
      return [Layer(attn_kind, stage, block, 1, level, index, ch,
                    self._heads(ch, stage == "output"), bool(no_sa[level]))]

    inputs = [[Layer("conv_in", "input", 0, 0, 0, 0, self.model_channels)]]
    ch, ds = self.model_channels, 1
    for level, mult in enumerate(self.channel_mult):
      for r in range(nrb[level]):
        n = len(inputs)
        ch = mult * self.model_channels
        block = [Layer("res", "input", n, 0, level, r, ch)]
        if ds in self.attention_resolutions:
          block += attn_layer("input", n, level, r, ch)
        inputs.append(block)
      if level != len(self.channel_mult) - 1:
        kind = "down_res" if self.resblock_updown else "down"
        inputs.append([Layer(kind, "input", len(inputs), 0, level, 0, ch)])
        ds *= 2
    last = len(self.channel_mult) - 1
    middle = [Layer("res", "middle", 0, 0, last, 0, ch),
              Layer(attn_kind, "middle", 0, 1, last, 0, ch, self._heads(ch, False),
                    self.disable_middle_self_attn),
              Layer("res", "middle", 0, 2, last, 1, ch)]
    outputs = []
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(nrb[level] + 1):
        n = len(outputs)
        ch = self.model_channels * mult
        block = [Layer("res", "output", n, 0, level, i, ch)]
        if ds in self.attention_resolutions:
          block += attn_layer("output", n, level, i, ch)
        if level and i == nrb[level]:
          kind = "up_res" if self.resblock_updown else "up"
          block.append(Layer(kind, "output", n, len(block), level, 0, ch))
          ds //= 2
        outputs.append(block)
    return inputs, middle, outputs

  # ---------------------------------------------------------------------------------------------
  # Forward
  # ---------------------------------------------------------------------------------------------
  def _embed(self, timesteps, y):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ted = 4 * self.model_channels
    t_emb = layers.timestep_embedding(timesteps, self.model_channels)  # [B, mc] fp32, cos first
    emb = nn.Dense(ted, name="time_embed_0", **kw)(t_emb)
    emb = nn.Dense(ted, name="time_embed_2", **kw)(nn.silu(emb))  # [B, 4 mc]
    if (y is None) != (self.num_classes is None):
      raise ValueError(f"UNetModel.num_classes={self.num_classes!r} but y is "
                       f"{'None' if y is None else 'given'}; y is needed exactly when num_classes "
                       f"is set.")
    if self.num_classes is None:
      return emb
    if isinstance(self.num_classes, int):
      return emb + nn.Embed(self.num_classes, ted, name="label_emb", **kw)(y)
    if self.num_classes == "continuous":
      y = y.reshape(y.shape[0], 1).astype(jnp.float32)  # a scalar per example
      return emb + nn.Dense(ted, name="label_emb", **kw)(y)
    if y.ndim != 2 or y.shape[-1] != self.adm_in_channels:
      raise ValueError(f"UNetModel: y has shape {y.shape}; expected [B, adm_in_channels="
                       f"{self.adm_in_channels}].")
    h = nn.silu(nn.Dense(ted, name="label_emb_0_0", **kw)(y))
    return emb + nn.Dense(ted, name="label_emb_0_2", **kw)(h)

  def _block_call(self, mod: nn.Module, call, stochastic: bool = False):
    """(h, emb, context, det) -> call(mod, h, emb, context, det), rematerialised if self.remat."""
    if not self.remat:
      return lambda h, emb, context, det: call(mod, h, emb, context, det)
    return lambda h, emb, context, det: remat_lib.recompute(
        lambda m, h, emb, context: call(m, h, emb, context, det), mod, h, emb, context,
        deterministic=det or not stochastic)

  def _make(self, layer: Layer, depth: int):
    """The Flax module for one layout entry and how to call it."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=layer.name)
    if layer.kind == "conv_in":
      mod = layers.conv(layer.channels, 3, **kw)
      return lambda h, emb, context, det: mod(h)
    if layer.kind in ("res", "down_res", "up_res"):
      resample = {"res": None, "down_res": "down", "up_res": "up"}[layer.kind]
      mod = ResBlock(layer.channels, self.dropout, self.use_scale_shift_norm, resample, **kw)
      return self._block_call(mod, lambda m, h, emb, context, det: m(h, emb, det),
                              stochastic=self.dropout > 0)
    if layer.kind == "transformer":
      mod = attention_lib.SpatialTransformer(
          layer.heads, layer.channels // layer.heads, depth, layer.disable_self_attn, **kw)
      return self._block_call(mod, lambda m, h, emb, context, det: m(h, context))
    if layer.kind == "attention":
      mod = attention_lib.AttentionBlock(layer.heads, **kw)
      return self._block_call(mod, lambda m, h, emb, context, det: m(h))
    if layer.kind == "down":
      mod = layers.Downsample(layer.channels, self.conv_resample, "unet", **kw)
      return lambda h, emb, context, det: mod(h)
    if layer.kind == "up":
      mod = layers.Upsample(layer.channels, self.conv_resample, **kw)
      return lambda h, emb, context, det: mod(h)
    raise AssertionError(layer.kind)

  @nn.compact
  def __call__(self, x, timesteps, context=None, y=None, *, deterministic: bool = True):
    """x: [B, H, W, in_channels]; timesteps: [B]; context: [B, L, context_dim] or None;
    y: [B] labels (int classes), [B] scalars ('continuous') or [B, adm_in_channels] ('sequential').
    Returns [B, H, W, out_channels]. Dropout draws from the 'dropout' rng when not deterministic.
    """
    inputs, middle, outputs = self.layout()
    check_input("UNetModel", x, self.in_channels, len(self.channel_mult))
    if self.use_spatial_transformer:
      if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
        shape = None if context is None else context.shape
        raise ValueError(f"UNetModel: context has shape {shape}; "
                         f"expected [B, L, context_dim={self.context_dim}].")
      context = context.astype(self.dtype)
    depth = self._per_level("transformer_depth", self.transformer_depth)

    emb = self._embed(timesteps, y)  # [B, 4 mc]
    h = x.astype(self.dtype)
    skips = []
    for block in inputs:
      for layer in block:
        h = self._make(layer, depth[layer.level])(h, emb, context, deterministic)
      skips.append(h)
    for layer in middle:
      h = self._make(layer, depth[layer.level])(h, emb, context, deterministic)
    for block in outputs:
      h = jnp.concatenate([h, skips.pop()], axis=-1)  # [h, skip] on channels
      for layer in block:
        h = self._make(layer, depth[layer.level])(h, emb, context, deterministic)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.GroupNorm(epsilon=1e-5, name="out_norm", **kw)(h))
    return layers.conv(self.out_channels, 3, name="out_conv", **kw)(h)  # [B, H, W, out]
