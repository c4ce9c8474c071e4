"""Weight import for the first-stage autoencoders: CompVis checkpoints and diffusers `vae/` folders.

Both importers build the Flax template with `jax.eval_shape` (models.autoencoder.abstract_params)
and name, for every template leaf, the torch key it comes from; `convert.common.strict_load` then
refuses any missing, unexpected or mis-shaped tensor.

Our parameter paths mirror the CompVis module tree with underscores (`down_1_block_0`,
`mid_attn_1`, `up_2_upsample`), so the CompVis mapping is a rename; diffusers stores the same
weights as `down_blocks.i.resnets.j`, `mid_block.{resnets,attentions}.k`, decoder `up_blocks`
numbered from the *lowest* resolution, and the attention q/k/v/out as Linear layers (or, in files
written by diffusers < 0.14, as `query/key/value/proj_attn`).
"""

import re
from typing import Any, Mapping

import numpy as np

from ldm_jax.convert.common import (Path, Transform, WeightLoadError, conv_kernel, identity,
                                    strict_load)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel, abstract_params

# Keys of a CompVis first stage that are not autoencoder weights: the training loss (LPIPS and
# the patch discriminator), the EMA copy some VQ runs keep, and the segmentation colouriser.
COMPVIS_IGNORED_PREFIXES = ("loss.", "model_ema.")
COMPVIS_IGNORED_KEYS = ("colorize",)

_BLOCK = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")
_MID = re.compile(r"^mid_(block_1|attn_1|block_2)$")


def _check_model(model: Any, fn: str):
  if not isinstance(model, (AutoencoderKL, VQModel)):
    raise TypeError(f"{fn}: model is a {type(model).__name__}; expected AutoencoderKL or VQModel.")


def _leaf(path: Path) -> tuple[list[str], str, str]:
  """Splits a template path into (module parts, torch leaf name, kind of tensor)."""
  *parts, leaf = path
  if leaf in ("scale", "bias") and len(parts) >= 2 and parts[-1] == "norm":
    parts = parts[:-1]  # layers.GroupNorm wraps nn.GroupNorm as a child called "norm"
    return parts, "weight" if leaf == "scale" else "bias", "norm"
  if leaf == "kernel":
    return parts, "weight", "kernel"
  if leaf == "embedding":
    return parts + ["embedding"], "weight", "embedding"
  return parts, leaf, "bias"


def _compvis_key(path: Path) -> tuple[str, Transform]:
  parts, leaf, kind = _leaf(path)
  out = []
  for p in parts:
    if m := _BLOCK.match(p):
      out.append(f"{m[1]}.{m[2]}.{m[3]}.{m[4]}")
    elif m := _RESAMPLE.match(p):
      out.append(f"{m[1]}.{m[2]}.{m[3]}")
    elif m := _MID.match(p):
      out.append(f"mid.{m[1]}")
    elif p == "op":  # layers.Downsample's conv; CompVis calls it `conv`
      out.append("conv")
    elif p == "quantizer":
      out.append("quantize")
    else:
      out.append(p)
  return ".".join(out + [leaf]), conv_kernel if kind == "kernel" else identity


def linear_as_conv1x1(w: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] (or 1x1 conv [out, in, 1, 1]) -> Flax 1x1 kernel [1, 1, in, out]."""
  if w.ndim == 4:
    return conv_kernel(w)
  return np.transpose(w, (1, 0))[None, None]


_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                   "proj_out": "to_out.0"}
_DIFFUSERS_ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value",
                       "proj_out": "proj_attn"}
_DIFFUSERS_RESNET = {"nin_shortcut": "conv_shortcut"}
_DIFFUSERS_TRUNK = {"norm_out": "conv_norm_out"}


def _diffusers_key_fn(levels: int, state_dict: Mapping[str, np.ndarray]):
  """Key function for diffusers names; `levels` = len(ch_mult) to flip the decoder's up_blocks."""
  old_attention = any(k.endswith(".query.weight") for k in state_dict)
  attn_names = _DIFFUSERS_ATTN_OLD if old_attention else _DIFFUSERS_ATTN

  def key_fn(path: Path) -> tuple[str, Transform]:
    parts, leaf, kind = _leaf(path)
    out, in_attn = [], False
    for p in parts:
      if m := _BLOCK.match(p):
        side, level, what, j = m[1], int(m[2]), m[3], m[4]
        index = level if side == "down" else levels - 1 - level
        sub = "resnets" if what == "block" else "attentions"
        out.append(f"{side}_blocks.{index}.{sub}.{j}")
        in_attn = what == "attn"
      elif m := _RESAMPLE.match(p):
        side, level = m[1], int(m[2])
        index = level if side == "down" else levels - 1 - level
        out.append(f"{side}_blocks.{index}.{side}samplers.0")
      elif m := _MID.match(p):
        which = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[m[1]]
        out.append(f"mid_block.{which}")
        in_attn = m[1] == "attn_1"
      elif p == "op":
        out.append("conv")
      elif p == "quantizer":
        out.append("quantize")
      elif in_attn and p in attn_names:
        out.append(attn_names[p])
      else:
        out.append(_DIFFUSERS_RESNET.get(p, _DIFFUSERS_TRUNK.get(p, p)))
    if kind != "kernel":
      transform = identity
    elif in_attn:
      transform = linear_as_conv1x1  # diffusers' VAE attention projections are Linear layers
    else:
      transform = conv_kernel
    return ".".join(out + [leaf]), transform
  return key_fn


def autoencoder_from_compvis(state_dict: Mapping[str, np.ndarray], model) -> dict:
  """CompVis first-stage weights (the `first_stage_model.` prefix already stripped) -> params.

  Returns the parameter tree to pass as `{"params": params}` to `model.apply`. Raises
  WeightLoadError listing every missing, unexpected or mis-shaped tensor.
  """
  _check_model(model, "autoencoder_from_compvis")
  return strict_load(abstract_params(model), state_dict, _compvis_key,
                     what=f"CompVis {type(model).__name__}", ignore=COMPVIS_IGNORED_KEYS,
                     ignore_prefixes=COMPVIS_IGNORED_PREFIXES)


def autoencoder_from_diffusers(state_dict: Mapping[str, np.ndarray], model) -> dict:
  """diffusers AutoencoderKL / VQModel weights (`vae/diffusion_pytorch_model.*`) -> params."""
  _check_model(model, "autoencoder_from_diffusers")
  key_fn = _diffusers_key_fn(len(model.ch_mult), state_dict)
  return strict_load(abstract_params(model), state_dict, key_fn,
                     what=f"diffusers {type(model).__name__}")


_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def _require(config: Mapping[str, Any], field: str, ok, expected: str):
  if field in config and config[field] is not None and not ok(config[field]):
    raise ValueError(f"diffusers config: {field}={config[field]!r}; expected {expected}.")


def autoencoder_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> tuple[str, dict]:
  """A diffusers AutoencoderKL / VQModel `config.json` dict -> (class name, our constructor kwargs).

  The class name is "AutoencoderKL" or "VQModel". Fields outside the constructor (scaling_factor,
  shift_factor, latents_mean/std, force_upcast) are the caller's to read from the config.
  """
  # Saved config.json files carry _class_name; an in-memory `model.config` does not.
  cls_name = config.get("_class_name") or ("VQModel" if "num_vq_embeddings" in config
                                           else "AutoencoderKL")
  if cls_name not in ("AutoencoderKL", "VQModel"):
    raise ValueError(f"diffusers config: _class_name={cls_name!r}; expected 'AutoencoderKL' or "
                     "'VQModel'.")
  _require(config, "act_fn", lambda v: v == "silu", "'silu'")
  _require(config, "use_quant_conv", bool, "True (models without quant_conv are not supported)")
  _require(config, "use_post_quant_conv", bool, "True")
  _require(config, "norm_type", lambda v: v == "group", "'group' (spatial norm is not supported)")
  _require(config, "lookup_from_codebook", lambda v: not v, "False")

  channels = [int(c) for c in config["block_out_channels"]]
  ch = channels[0]
  if any(c % ch for c in channels):
    raise ValueError(f"diffusers config: block_out_channels={channels}; expected multiples of the "
                     f"first entry {ch}.")
  levels = len(channels)
  down = list(config.get("down_block_types", ["DownEncoderBlock2D"] * levels))
  up = list(config.get("up_block_types", ["UpDecoderBlock2D"] * levels))
  for field, types, known in (("down_block_types", down, _DOWN_TYPES),
                              ("up_block_types", up, _UP_TYPES)):
    if len(types) != levels or any(t not in known for t in types):
      raise ValueError(f"diffusers config: {field}={types}; expected {levels} entries from "
                       f"{sorted(known)}.")
  down_attn = [_DOWN_TYPES[t] for t in down]
  up_attn = [_UP_TYPES[t] for t in reversed(up)]  # up_block_types runs from the lowest resolution
  if down_attn != up_attn:
    raise ValueError(f"diffusers config: down_block_types={down} and up_block_types={up} put "
                     "attention at different resolutions; expected mirrored encoder and decoder.")

  sample_size = config.get("sample_size", 2 ** (levels - 1))
  resolution = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
  attn_resolutions = tuple(resolution // 2 ** i for i in range(levels) if down_attn[i])
  mid_attention = config.get("mid_block_add_attention", True)
  if not mid_attention and attn_resolutions:
    raise ValueError("diffusers config: mid_block_add_attention=False with attention blocks in "
                     f"{down}; expected either no attention at all or a mid-block attention.")

  latent = int(config.get("latent_channels", 4))
  kwargs = dict(ch=ch, out_ch=int(config.get("out_channels", 3)),
                ch_mult=tuple(c // ch for c in channels),
                num_res_blocks=int(config.get("layers_per_block", 1)),
                attn_resolutions=attn_resolutions, in_channels=int(config.get("in_channels", 3)),
                resolution=resolution, z_channels=latent, dropout=0.0,
                attn_type="vanilla" if mid_attention else "none",
                norm_num_groups=int(config.get("norm_num_groups", 32)))
  if cls_name == "AutoencoderKL":
    kwargs.update(double_z=True, embed_dim=latent)
  else:
    embed_dim = config.get("vq_embed_dim") or latent
    kwargs.update(double_z=False, embed_dim=int(embed_dim),
                  n_embed=int(config.get("num_vq_embeddings", 256)))
  return cls_name, kwargs


__all__ = ["WeightLoadError", "autoencoder_from_compvis", "autoencoder_from_diffusers",
           "autoencoder_kwargs_from_diffusers_config", "linear_as_conv1x1"]
