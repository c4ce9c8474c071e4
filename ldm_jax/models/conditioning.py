"""Non-text conditioning encoders and the factory that builds any `cond_stage_model`.

* `ClassEmbedder`: class labels [B] -> [B, 1, D] cross-attention context (CompVis ClassEmbedder).
  The classifier-free-guidance null class is the last index (`null_label`, e.g. 1000 of 1001 for
  cin256-v2); with `ucg_rate` > 0 training replaces labels by it with that probability.
* `SpatialRescaler`: resizes a map n_stages times by `multiplier` exactly as torch
  `F.interpolate(x, scale_factor=multiplier, mode=method)` (output size floor(size * multiplier),
  source coordinates from the scale factor, not from the size ratio, no antialiasing), then an
  optional 1x1 conv. `jax.image.resize` differs (it antialiases when shrinking and uses the size
  ratio), so the resize is written as two small interpolation matrices built on the host.
* `make_cond_stage` / `cond_stage_from_compvis`: build a conditioning module from plain kwargs or
  from a CompVis YAML `cond_stage_config` (target + params).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.bert import BertEncoder
from ldm_jax.models.text import CLIPTextEncoder, LDMTextTransformer

Dtype = Any


class ClassEmbedder(nn.Module):
  """labels [B] int -> [B, 1, embed_dim]."""
  n_classes: int
  embed_dim: int
  ucg_rate: float = 0.0  # probability of replacing a label by null_label when not deterministic
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def null_label(self) -> int:
    """The unconditional class used for classifier-free guidance (the last index)."""
    return self.n_classes - 1

  @nn.compact
  def __call__(self, labels, deterministic: bool = True):
    """Label dropout (ucg_rate) draws from the 'dropout' rng when deterministic is False."""
    if labels.ndim != 1:
      raise ValueError(f"ClassEmbedder: labels.shape={tuple(labels.shape)}; expected [batch].")
    if self.ucg_rate > 0 and not deterministic:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.ucg_rate, labels.shape)
      labels = jnp.where(drop, self.null_label, labels)
    emb = nn.Embed(self.n_classes, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="embedding")(labels)  # [B, D]
    return emb[:, None, :]  # [B, 1, D]


RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area")


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
  """torch's cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resize_matrix(in_size: int, scale_factor: float, method: str) -> np.ndarray:
  """[out, in] float32 matrix M, out = floor(in * scale_factor), such that y = M @ x equals torch
  `F.interpolate(..., scale_factor=scale_factor, mode=method, align_corners=False)` on one axis.
  """
  out_size = int(math.floor(in_size * scale_factor))
  if out_size < 1:
    raise ValueError(f"SpatialRescaler: size {in_size} x multiplier {scale_factor} rounds to "
                     f"{out_size} pixels; expected at least 1.")
  m = np.zeros((out_size, in_size), np.float64)
  # torch maps output to input coordinates with float32(1 / scale_factor) (double division).
  scale = float(np.float32(1.0 / scale_factor))
  for o in range(out_size):
    if method == "nearest":
      m[o, min(int(math.floor(np.float32(o) * np.float32(scale))), in_size - 1)] = 1.0
    elif method == "bilinear":
      src = max(scale * (o + 0.5) - 0.5, 0.0)
      i0 = int(src)
      i1 = i0 + (1 if i0 < in_size - 1 else 0)
      frac = src - i0
      m[o, i0] += 1.0 - frac
      m[o, i1] += frac
    elif method == "bicubic":
      src = scale * (o + 0.5) - 0.5  # not clamped for cubic; taps are clamped instead
      i0 = int(math.floor(src))
      for k, w in enumerate(_cubic_weights(src - i0)):
        m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
    elif method == "area":  # adaptive average pooling to out_size
      start = (o * in_size) // out_size
      end = -((-(o + 1) * in_size) // out_size)
      m[o, start:end] = 1.0 / (end - start)
    else:
      raise ValueError(f"SpatialRescaler.method={method!r}; expected one of {RESIZE_METHODS} "
                       "('linear'/'trilinear' only apply to 3D/5D inputs in torch).")
  return m.astype(np.float32)


class SpatialRescaler(nn.Module):
  """Resizes [B, H, W, C] n_stages times by `multiplier`, then an optional 1x1 conv."""
  n_stages: int = 1
  method: str = "bilinear"
  multiplier: float = 0.5
  in_channels: int = 3
  out_channels: int | None = None
  bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"SpatialRescaler: input shape {tuple(x.shape)}; expected "
                       f"[B, H, W, in_channels={self.in_channels}].")
    if self.n_stages < 0:
      raise ValueError(f"SpatialRescaler.n_stages={self.n_stages}; expected >= 0.")
    y = x.astype(jnp.float32)
    for _ in range(self.n_stages):
      mh = jnp.asarray(resize_matrix(y.shape[1], self.multiplier, self.method))  # [H', H]
      mw = jnp.asarray(resize_matrix(y.shape[2], self.multiplier, self.method))  # [W', W]
      y = jnp.einsum("oh,bhwc->bowc", mh, y, precision=jax.lax.Precision.HIGHEST)  # [B, H', W, C]
      y = jnp.einsum("pw,bowc->bopc", mw, y, precision=jax.lax.Precision.HIGHEST)  # [B, H', W', C]
    y = y.astype(self.dtype)
    if self.out_channels is not None:
      y = nn.Conv(self.out_channels, (1, 1), use_bias=self.bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="channel_mapper")(y)  # [B, H', W', C']
    return y


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

# Text towers of the released models, by the name their YAML gives (CLIP heads = width / 64).
CLIP_ARCHS = {
    "openai/clip-vit-large-patch14": dict(width=768, layers=12, heads=12, activation="quick_gelu"),
    "ViT-L-14": dict(width=768, layers=12, heads=12, activation="gelu"),
    "ViT-H-14": dict(width=1024, layers=24, heads=16, activation="gelu"),
    "ViT-bigG-14": dict(width=1280, layers=32, heads=20, activation="gelu"),
}

_KINDS = {
    "class": ClassEmbedder,
    "clip": CLIPTextEncoder,
    "ldm_bert": LDMTextTransformer,
    "bert": BertEncoder,
    "rescaler": SpatialRescaler,
}

# Which tokenizer family (ldm_jax.models.tokenizers) feeds each kind; None: no tokenizer.
TOKENIZER_KIND = {"class": None, "clip": "clip", "ldm_bert": "bert", "bert": "bert",
                  "rescaler": None}


def make_cond_stage(kind: str, **kwargs) -> nn.Module:
  """Builds a conditioning module from plain kwargs: kind in 'class', 'clip', 'ldm_bert', 'bert',
  'rescaler' (the kwargs are the module's fields)."""
  if kind not in _KINDS:
    raise ValueError(f"cond stage kind={kind!r}; expected one of {sorted(_KINDS)}.")
  cls = _KINDS[kind]
  unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__) - {"parent", "name"})
  if unknown:
    raise ValueError(f"cond stage kind={kind!r}: unknown arguments {unknown} for {cls.__name__}.")
  return cls(**kwargs)


def _clip_arch(name: str) -> dict:
  if name not in CLIP_ARCHS:
    raise ValueError(f"text encoder {name!r} is not a known architecture; expected one of "
                     f"{sorted(CLIP_ARCHS)} (or build CLIPTextEncoder from a local config.json "
                     "with ldm_jax.convert.text.clip_kwargs_from_hf_config).")
  return dict(CLIP_ARCHS[name])


def cond_stage_from_compvis(target: str, params: dict | None = None,
                            **overrides) -> tuple[nn.Module, str | None]:
  """(module, tokenizer kind) for a CompVis `cond_stage_config` (`target`, `params`).

  Supports ldm.modules.encoders.modules.{ClassEmbedder, BERTEmbedder, TransformerEmbedder,
  FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, SpatialRescaler}. `overrides` (e.g. dtype) go to the
  module. The tokenizer kind is None where the module takes ids, labels or images directly.
  """
  params = dict(params or {})
  name = target.rsplit(".", 1)[-1]
  tokenized = True  # False: an LDM text transformer fed token ids without a tokenizer

  def take(key, default):
    return params.pop(key, default)

  if name == "ClassEmbedder":
    take("key", None)  # the batch key, not part of the network
    kind, kw = "class", dict(embed_dim=take("embed_dim", None), n_classes=take("n_classes", 1000),
                             ucg_rate=take("ucg_rate", 0.0))
  elif name in ("BERTEmbedder", "TransformerEmbedder"):
    # Both wrap the same x-transformers Encoder (8 heads of 64, fixed by the ldm code). Without the
    # tokenizer (TransformerEmbedder, or use_tokenizer=False) token ids are fed directly.
    tokenized = take("use_tokenizer", True) if name == "BERTEmbedder" else False
    take("device", None)
    take("embedding_dropout", 0.0)  # inference-irrelevant; the released model uses 0
    kind, kw = "ldm_bert", dict(width=take("n_embed", None), depth=take("n_layer", None),
                                vocab_size=take("vocab_size", 30522),
                                max_length=take("max_seq_len", 77))
  elif name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"):
    openclip = name == "FrozenOpenCLIPEmbedder"
    if openclip:
      arch = take("arch", "ViT-H-14")
    else:
      arch = take("version", "openai/clip-vit-large-patch14")
    for unused in ("version", "device", "freeze", "layer_idx"):
      take(unused, None)
    layer = take("layer", "last")
    if layer not in ("last", "penultimate"):
      raise ValueError(f"{name}.layer={layer!r}; expected 'last' or 'penultimate'.")
    kind = "clip"
    kw = dict(_clip_arch(arch), max_length=take("max_length", 77), output_layer=layer)
  elif name == "SpatialRescaler":
    kind, kw = "rescaler", {k: take(k, d) for k, d in (
        ("n_stages", 1), ("method", "bilinear"), ("multiplier", 0.5), ("in_channels", 3),
        ("out_channels", None), ("bias", False))}
  else:
    raise ValueError(f"cond_stage_config.target={target!r} is not supported; expected a CompVis "
                     "ClassEmbedder, BERTEmbedder, TransformerEmbedder, FrozenCLIPEmbedder, "
                     "FrozenOpenCLIPEmbedder or SpatialRescaler.")
  if params:
    raise ValueError(f"cond_stage_config {name}: unknown params {sorted(params)}.")
  missing = sorted(k for k, v in kw.items() if v is None and k != "out_channels")
  if missing:
    raise ValueError(f"cond_stage_config {name}: required params {missing} are missing.")
  tokenizer = "openclip" if name == "FrozenOpenCLIPEmbedder" else TOKENIZER_KIND[kind]
  if kind == "ldm_bert" and not tokenized:
    tokenizer = None
  return make_cond_stage(kind, **kw, **overrides), tokenizer
