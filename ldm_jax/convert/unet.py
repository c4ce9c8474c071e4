"""Weight import for `ldm_jax.models.unet.UNetModel` from CompVis checkpoints and diffusers folders.

  * `unet_from_compvis(state_dict, model)`: keys as under `model.diffusion_model.` (prefix
    stripped).
  * `unet_from_diffusers(state_dict, model)`: `UNet2DConditionModel` or `UNet2DModel` key names.
  * `unet_kwargs_from_diffusers_config(config)`: a diffusers `unet/config.json` dict -> UNetModel
    kwargs.

Both importers walk the `jax.eval_shape` parameter template of the model and name, for every leaf,
the torch key it comes from (`convert.common.strict_load`), using `UNetModel.layout()` to know which
layer sits at which CompVis / diffusers position. Arrays must already be numpy
(e.g. `t.float().numpy()`).
"""

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import common
from ldm_jax.models import unet as unet_lib

Path = tuple[str, ...]

# ResBlock sub-modules: ours -> (CompVis, diffusers ResnetBlock2D).
_RES = {"in_norm": ("in_layers.0", "norm1"), "in_conv": ("in_layers.2", "conv1"),
        "emb_proj": ("emb_layers.1", "time_emb_proj"), "out_norm": ("out_layers.0", "norm2"),
        "out_conv": ("out_layers.3", "conv2"), "skip": ("skip_connection", "conv_shortcut")}
# Top-level modules outside the blocks: ours -> (CompVis, diffusers).
_TOP = {"time_embed_0": ("time_embed.0", "time_embedding.linear_1"),
        "time_embed_2": ("time_embed.2", "time_embedding.linear_2"),
        "label_emb": ("label_emb", "class_embedding"),
        "label_emb_0_0": ("label_emb.0.0", "class_embedding.linear_1"),
        "label_emb_0_2": ("label_emb.0.2", "class_embedding.linear_2"),
        "out_norm": ("out.0", "conv_norm_out"), "out_conv": ("out.2", "conv_out")}
_LEAF = {"scale": "weight", "bias": "bias", "kernel": "weight", "embedding": "weight"}


def _dense(src_ndim: int):
  """torch linear / 1x1 conv / conv1d -> Dense kernel, only from a tensor of the expected rank.

  A wrong rank means the checkpoint was saved with the other projection style (e.g. conv proj_in
  into a use_linear_in_transformer model); the tensor is passed on with an extra axis so strict_load
  reports it as a shape mismatch instead of loading it silently.
  """
  def transform(w):
    return common.dense_kernel(w) if w.ndim == src_ndim else w[None]
  return transform


def _conv(w):
  return common.conv_kernel(w) if w.ndim == 4 else w[None]


def _positions(model: unet_lib.UNetModel) -> dict[str, tuple[unet_lib.Layer, str, str]]:
  """Our module name -> (layout entry, CompVis prefix, diffusers prefix)."""
  inputs, middle, outputs = model.layout()
  top = len(model.channel_mult) - 1
  out = {}
  for layer in [l for block in inputs for l in block] + middle + [l for b in outputs for l in b]:
    if layer.stage == "middle":
      cv = f"middle_block.{layer.pos}"
      df = {"res": f"mid_block.resnets.{layer.index}"}.get(layer.kind, "mid_block.attentions.0")
    else:
      cv = f"{layer.stage}_blocks.{layer.block}.{layer.pos}"
      blocks = (f"down_blocks.{layer.level}" if layer.stage == "input"
                else f"up_blocks.{top - layer.level}")
      if layer.kind == "conv_in":
        df = "conv_in"
      elif layer.kind == "res":
        df = f"{blocks}.resnets.{layer.index}"
      elif layer.kind in ("transformer", "attention"):
        df = f"{blocks}.attentions.{layer.index}"
      else:
        df = f"{blocks}.{'downsamplers' if layer.stage == 'input' else 'upsamplers'}.0"
    out[layer.name] = (layer, cv, df)
  return out


def _local(layer: unet_lib.Layer, sub: Path, diffusers: bool, linear_proj: bool) -> tuple[str, Any]:
  """(torch key suffix, transform) for a leaf `sub` = (module, ..., leaf) inside a layout layer."""
  leaf, mods = sub[-1], list(sub[:-1])
  if len(mods) >= 2 and mods[-1] == "norm":
    mods = mods[:-1]  # the inner nn.GroupNorm / nn.LayerNorm of our fp32 norm wrappers
  transform = common.identity
  if leaf == "kernel":
    transform = _conv
  kind = layer.kind
  if kind in ("res", "down_res", "up_res"):
    mods = [_RES[mods[0]][int(diffusers)]]
    if leaf == "kernel" and sub[0] == "emb_proj":
      transform = _dense(2)
  elif kind == "conv_in":
    mods = []
  elif kind == "down":
    mods = ["conv" if diffusers else "op"]
  elif kind == "up":
    mods = ["conv"]
  elif kind == "attention":
    if leaf == "kernel":
      transform = _dense(2 if diffusers else 3)  # diffusers Linear, CompVis conv1d
    if diffusers:
      mods = [{"norm": "group_norm", "qkv": "qkv", "proj_out": "to_out.0"}[mods[0]]]
  elif kind == "transformer":
    renamed = []
    for i, m in enumerate(mods):
      if m.startswith("transformer_blocks_"):
        m = "transformer_blocks." + m[len("transformer_blocks_"):]
      elif m == "to_out":
        m = "to_out.0"
      elif m == "proj" and mods[i - 1] == "ff":
        m = "net.0.proj"
      elif m == "out" and mods[i - 1] == "ff":
        m = "net.2"
      renamed.append(m)
    mods = renamed
    if leaf == "kernel":
      conv_style = mods[0] in ("proj_in", "proj_out") and not linear_proj
      transform = _dense(4 if conv_style else 2)
  return ".".join(mods + [_LEAF[leaf]]), transform


def _template(model: unet_lib.UNetModel) -> dict:
  """Abstract parameters of `model` for a minimal input (nothing is allocated)."""
  size = 2 ** (len(model.channel_mult) - 1)
  x = jnp.zeros((1, size, size, model.in_channels), model.dtype)
  t = jnp.zeros((1,), jnp.float32)
  context = jnp.zeros((1, 1, model.context_dim)) if model.use_spatial_transformer else None
  y = None
  if isinstance(model.num_classes, int):
    y = jnp.zeros((1,), jnp.int32)
  elif model.num_classes == "continuous":
    y = jnp.zeros((1,))
  elif model.num_classes == "sequential":
    y = jnp.zeros((1, model.adm_in_channels))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, context, y)
  return variables["params"]


def key_map(model: unet_lib.UNetModel, *, diffusers: bool) -> dict[Path, tuple[str, Any]]:
  """Every parameter path of `model` -> (torch key, transform to our layout), in the CompVis or
  the diffusers naming. The importers load through it, and so does anything else that addresses
  the UNet's weights by their torch names (LoRA files), so both agree on every tensor."""
  positions = _positions(model)

  def key_fn(path: Path):
    head, sub = path[0], path[1:]
    if head in _TOP:
      name = _TOP[head][int(diffusers)]
      if path[-1] == "kernel":
        return f"{name}.weight", _conv if head == "out_conv" else _dense(2)
      return f"{name}.{_LEAF[path[-1]]}", common.identity
    layer, cv, df = positions[head]
    suffix, transform = _local(layer, sub, diffusers, model.use_linear_in_transformer)
    prefix = df if diffusers else cv
    return (f"{prefix}.{suffix}" if suffix else prefix), transform

  return {path: key_fn(path) for path in common.flatten(_template(model))}


def _load(state_dict, model, diffusers: bool, what: str) -> dict:
  keys = key_map(model, diffusers=diffusers)
  return common.strict_load(_template(model), state_dict, keys.__getitem__, what=what)


def unet_from_compvis(state_dict: Mapping[str, np.ndarray], model: unet_lib.UNetModel) -> dict:
  """CompVis openaimodel state dict (`model.diffusion_model.` stripped) -> our params tree.

  Raises common.WeightLoadError naming every missing, unexpected or mis-shaped key.
  """
  return _load(state_dict, model, diffusers=False, what="UNetModel (CompVis keys)")


_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _fuse_legacy_qkv(state_dict, model) -> dict:
  """diffusers' separate to_q/to_k/to_v of legacy attention -> one per-head-interleaved `qkv`.

  Our AttentionBlock keeps CompVis' fused layout [h0: q, k, v | h1: ...]; the fused tensor is put in
  under the virtual key `<prefix>.qkv.*`. Old diffusers names (query/key/value/proj_attn) are
  renamed first.
  """
  sd = dict(state_dict)
  for layer, _, prefix in _positions(model).values():
    if layer.kind != "attention":
      continue
    for old, new in _OLD_ATTN.items():
      for leaf in ("weight", "bias"):
        if f"{prefix}.{old}.{leaf}" in sd:
          sd[f"{prefix}.{new}.{leaf}"] = sd.pop(f"{prefix}.{old}.{leaf}")
    for leaf in ("weight", "bias"):
      keys = [f"{prefix}.to_{n}.{leaf}" for n in "qkv"]
      if not all(k in sd for k in keys):
        continue  # reported by strict_load as missing qkv + unexpected leftovers
      parts = [np.asarray(sd[k]) for k in keys]  # each [C, C] or [C]
      c = layer.channels
      if any(p.shape != parts[0].shape for p in parts) or parts[0].shape[:1] != (c,) or \
          math.prod(parts[0].shape[1:]) > c:
        continue  # left unfused, unread: strict_load reports them; nothing is copied
      for k in keys:
        del sd[k]
      per_head = [p.reshape(layer.heads, c // layer.heads, *p.shape[1:]) for p in parts]
      fused = np.stack(per_head, axis=1)  # [heads, 3, ch, (C)]
      sd[f"{prefix}.qkv.{leaf}"] = fused.reshape(3 * c, *parts[0].shape[1:])
  return sd


def unet_from_diffusers(state_dict: Mapping[str, np.ndarray], model: unet_lib.UNetModel) -> dict:
  """diffusers UNet2DConditionModel / UNet2DModel state dict -> our params tree.

  Build `model` with `UNetModel(**unet_kwargs_from_diffusers_config(config))`.
  Raises common.WeightLoadError naming every missing, unexpected or mis-shaped key.
  """
  sd = _fuse_legacy_qkv(state_dict, model)
  return _load(sd, model, diffusers=True, what="UNetModel (diffusers keys)")


# -------------------------------------------------------------------------------------------------
# diffusers config.json -> UNetModel kwargs
# -------------------------------------------------------------------------------------------------
# Options with these values are what the CompVis UNet does; anything else is a model we cannot run.
_REQUIRED_COMMON = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "time_embedding_type": "positional",
    "time_embedding_dim": None}
_REQUIRED_CONDITION = {
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "addition_embed_type": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "mid_block_type": "UNetMidBlock2DCrossAttn"}
_REQUIRED_2D = {"mid_block_type": "UNetMidBlock2D", "add_attention": True}


def _check(config: Mapping[str, Any], required: Mapping[str, Any], cls: str):
  for key, expected in required.items():
    value = config.get(key, expected)
    if value != expected:
      raise ValueError(f"diffusers {cls} config: {key}={value!r} is not supported; expected "
                       f"{expected!r} (the CompVis UNet has no equivalent).")


def _per_level(config, key, levels, default):
  value = config.get(key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ValueError(f"diffusers config: {key}={value} has {len(value)} entries; expected "
                       f"{levels} (one per block).")
    return tuple(value)
  return (value,) * levels


def _heads_kwargs(channels, heads_per_level, cls) -> dict:
  """Per-level head counts -> num_heads (same count everywhere) or num_head_channels (one width)."""
  if len(set(heads_per_level)) == 1:
    return {"num_heads": heads_per_level[0]}
  widths = {c // h for c, h in zip(channels, heads_per_level)}
  if len(widths) == 1 and all(c % h == 0 for c, h in zip(channels, heads_per_level)):
    return {"num_head_channels": widths.pop()}
  raise ValueError(f"diffusers {cls} config: attention heads per block {heads_per_level} for "
                   f"channels {channels} are neither constant nor a constant head width.")


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict:
  """A diffusers UNet2DConditionModel / UNet2DModel `config.json` dict -> UNetModel kwargs."""
  config = dict(config)
  cls = config.get("_class_name")
  if cls is None:
    cls = "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
  if cls not in ("UNet2DConditionModel", "UNet2DModel"):
    raise ValueError(f"diffusers config: _class_name={cls!r}; expected 'UNet2DConditionModel' or "
                     f"'UNet2DModel'.")
  _check(config, _REQUIRED_COMMON, cls)
  _check(config, _REQUIRED_CONDITION if cls == "UNet2DConditionModel" else _REQUIRED_2D, cls)
  channels = tuple(config["block_out_channels"])
  mc = channels[0]
  if any(c % mc for c in channels):
    raise ValueError(f"diffusers {cls} config: block_out_channels={channels}; expected multiples "
                     f"of the first entry.")
  levels = len(channels)
  down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
  if len(down) != levels or len(up) != levels:
    raise ValueError(f"diffusers {cls} config: {len(down)} down / {len(up)} up block types for "
                     f"{levels} block_out_channels; expected {levels} each.")
  layers = config.get("layers_per_block", 2)
  kwargs = dict(in_channels=config.get("in_channels", 4 if cls == "UNet2DConditionModel" else 3),
                out_channels=config.get("out_channels", 4 if cls == "UNet2DConditionModel" else 3),
                model_channels=mc, channel_mult=tuple(c // mc for c in channels),
                num_res_blocks=tuple(layers) if isinstance(layers, (list, tuple)) else layers,
                dropout=float(config.get("dropout", 0.0)))
  shift = config.get("resnet_time_scale_shift", "default")
  if shift not in ("default", "scale_shift"):
    raise ValueError(f"diffusers {cls} config: resnet_time_scale_shift={shift!r}; expected "
                     f"'default' or 'scale_shift'.")
  kwargs["use_scale_shift_norm"] = shift == "scale_shift"
  if cls == "UNet2DConditionModel":
    kwargs.update(_condition_kwargs(config, down, up, channels))
  else:
    kwargs.update(_unet2d_kwargs(config, down, up, shift))
  return kwargs


def _attention_levels(down, up, attn_down, attn_up, plain_down, plain_up, cls):
  levels = len(down)
  for i, (d, u) in enumerate(zip(down, reversed(up))):
    if d not in (attn_down, ) + plain_down or u not in (attn_up, ) + plain_up:
      raise ValueError(f"diffusers {cls} config: block types ({d!r}, {u!r}) at level {i} are not "
                       f"supported; expected {attn_down}/{attn_up} or {plain_down}/{plain_up}.")
    if (d == attn_down) != (u == attn_up):
      raise ValueError(f"diffusers {cls} config: down block {d!r} and up block {u!r} of level {i} "
                       f"disagree on attention; the CompVis UNet needs both or neither.")
  return tuple(2 ** i for i in range(levels) if down[i] == attn_down)


def _condition_kwargs(config, down, up, channels) -> dict:
  cls = "UNet2DConditionModel"
  levels = len(channels)
  attn = _attention_levels(down, up, "CrossAttnDownBlock2D", "CrossAttnUpBlock2D",
                           ("DownBlock2D",), ("UpBlock2D",), cls)
  context_dim = config.get("cross_attention_dim", 1280)
  if isinstance(context_dim, (list, tuple)):
    if len(set(context_dim)) != 1:
      raise ValueError(f"diffusers {cls} config: cross_attention_dim={context_dim}; expected one "
                       f"width for all blocks.")
    context_dim = context_dim[0]
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  heads = _per_level({"heads": heads}, "heads", levels, None)
  used = [i for i in range(levels) if 2 ** i in attn] + [levels - 1]  # the middle uses the last
  kwargs = _heads_kwargs([channels[i] for i in used], [heads[i] for i in used], cls)
  depth = _per_level(config, "transformer_layers_per_block", levels, 1)
  if any(isinstance(d, (list, tuple)) for d in depth):
    raise ValueError(f"diffusers {cls} config: nested transformer_layers_per_block={depth} is not "
                     f"supported; expected an int or one int per block.")
  only_cross = _per_level(config, "only_cross_attention", levels, False)
  kwargs.update(attention_resolutions=attn, use_spatial_transformer=True, context_dim=context_dim,
                transformer_depth=depth[0] if len(set(depth)) == 1 else depth,
                use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
                disable_self_attentions=tuple(only_cross) if any(only_cross) else None)
  class_type = config.get("class_embed_type")
  if class_type is None and config.get("num_class_embeds") is not None:
    kwargs["num_classes"] = int(config["num_class_embeds"])
  elif class_type == "projection":
    kwargs.update(num_classes="sequential",
                  adm_in_channels=int(config["projection_class_embeddings_input_dim"]))
  elif class_type is not None:
    raise ValueError(f"diffusers {cls} config: class_embed_type={class_type!r}; expected None "
                     f"(with num_class_embeds) or 'projection'.")
  return kwargs


def _resample_style(block: str, attn_block: str, attn_style: str, conv_block: str,
                    res_block: str) -> str:
  return {attn_block: attn_style, conv_block: "conv", res_block: "resnet"}[block]


def _unet2d_kwargs(config, down, up, shift) -> dict:
  cls = "UNet2DModel"
  attn = _attention_levels(down, up, "AttnDownBlock2D", "AttnUpBlock2D",
                           ("DownBlock2D", "ResnetDownsampleBlock2D"),
                           ("UpBlock2D", "ResnetUpsampleBlock2D"), cls)
  styles = {_resample_style(b, "AttnDownBlock2D", config.get("downsample_type", "conv"),
                            "DownBlock2D", "ResnetDownsampleBlock2D") for b in down[:-1]}
  styles |= {_resample_style(b, "AttnUpBlock2D", config.get("upsample_type", "conv"),
                             "UpBlock2D", "ResnetUpsampleBlock2D") for b in up[:-1]}
  if len(styles) > 1 or not styles <= {"conv", "resnet"}:
    raise ValueError(f"diffusers {cls} config: down/up sampling styles {sorted(styles)} (from "
                     f"block types and downsample_type/upsample_type); expected all 'conv' or all "
                     f"'resnet'.")
  attn_groups = config.get("attn_norm_num_groups")
  if shift != "default" and attn_groups != 32:
    # diffusers drops the middle attention's GroupNorm then; CompVis always has it.
    raise ValueError(f"diffusers {cls} config: attn_norm_num_groups={attn_groups!r} with "
                     f"resnet_time_scale_shift={shift!r}; expected 32.")
  if attn_groups not in (None, 32):
    raise ValueError(f"diffusers {cls} config: attn_norm_num_groups={attn_groups}; expected 32.")
  head_dim = config.get("attention_head_dim", 8)
  kwargs = {"num_heads": 1} if head_dim is None else {"num_head_channels": int(head_dim)}
  kwargs.update(attention_resolutions=attn, legacy=True, resblock_updown=styles == {"resnet"})
  class_type = config.get("class_embed_type")
  if class_type is not None:
    raise ValueError(f"diffusers {cls} config: class_embed_type={class_type!r}; expected None.")
  if config.get("num_class_embeds") is not None:
    kwargs["num_classes"] = int(config["num_class_embeds"])
  return kwargs
