"""Builds the networks of a latent diffusion model from a plain model-config dict.

The model config (``config.model`` in every experiment file, and what ``compvis_config`` translates an
original YAML into) has four parts:

  first_stage: {kind: 'kl' | 'vq', kwargs: {...Encoder/Decoder fields, embed_dim, n_embed}}
  unet:        {...UNetModel fields}
  cond_stage:  {kind: 'none' | 'class' | 'ldm_bert' | 'clip' | 'openclip' | 'bert' | 'identity'
                      | 'spatial_rescaler', kwargs: {...}, tokenizer: {kind, path}, trainable: bool}
  diffusion:   {timesteps, beta_schedule, linear_start, linear_end, parameterization,
                conditioning_key, scale_factor, scale_by_std, ...}

The modules themselves receive plain keyword arguments, never ConfigDicts.
"""

from typing import Any, Mapping

import jax.numpy as jnp

from ldm_jax.models import autoencoder as autoencoder_lib
from ldm_jax.models import bert as bert_lib
from ldm_jax.models import conditioning as conditioning_lib
from ldm_jax.models import text as text_lib
from ldm_jax.models import unet as unet_lib

FIRST_STAGES = {"kl": "AutoencoderKL", "vq": "VQModel"}
TEXT_ENCODERS = {"ldm_bert": "LDMTextTransformer", "clip": "CLIPTextEncoder",
                 "openclip": "CLIPTextEncoder", "bert": "BertEncoder"}
# 'first_stage': the paper's inpainting models concatenate the first stage's encoding of the masked
# image (and the mask); no parameters of their own.
COND_KINDS = ("none", "class", "identity", "first_stage", "spatial_rescaler") + tuple(TEXT_ENCODERS)


def _plain(d: Mapping[str, Any] | None) -> dict[str, Any]:
  """ConfigDict / FrozenConfigDict / dict -> dict of plain values (lists become tuples)."""
  if d is None:
    return {}
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d).items()}


def dtypes(compute_dtype: str = "float32") -> dict[str, Any]:
  """The dtype/param_dtype pair every module takes: params stay fp32, compute as configured."""
  if compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"compute_dtype={compute_dtype!r}; expected 'float32' or 'bfloat16'.")
  return dict(dtype=jnp.dtype(compute_dtype), param_dtype=jnp.float32)


def build_first_stage(cfg: Mapping[str, Any], compute_dtype: str = "float32"):
  kind = cfg["kind"]
  if kind not in FIRST_STAGES:
    raise ValueError(f"model.first_stage.kind={kind!r}; expected one of {sorted(FIRST_STAGES)}.")
  cls = getattr(autoencoder_lib, FIRST_STAGES[kind])
  return cls(**_plain(cfg["kwargs"]), **dtypes(compute_dtype))


def build_unet(cfg: Mapping[str, Any], compute_dtype: str = "float32", remat: bool | None = None):
  kwargs = _plain(cfg)
  if remat is not None:
    kwargs["remat"] = remat
  return unet_lib.UNetModel(**kwargs, **dtypes(compute_dtype))


def build_cond_stage(cfg: Mapping[str, Any] | None, compute_dtype: str = "float32"):
  """Returns the conditioning module, or None for 'none' and 'identity' (no parameters)."""
  kind = (cfg or {}).get("kind", "none")
  if kind not in COND_KINDS:
    raise ValueError(f"model.cond_stage.kind={kind!r}; expected one of {list(COND_KINDS)}.")
  if kind in ("none", "identity", "first_stage"):
    return None
  kwargs = _plain(cfg.get("kwargs"))
  if kind == "class":
    return conditioning_lib.ClassEmbedder(**kwargs, **dtypes(compute_dtype))
  if kind == "spatial_rescaler":
    return conditioning_lib.SpatialRescaler(**kwargs, **dtypes(compute_dtype))
  module = bert_lib if kind == "bert" else text_lib
  return getattr(module, TEXT_ENCODERS[kind])(**kwargs, **dtypes(compute_dtype))
