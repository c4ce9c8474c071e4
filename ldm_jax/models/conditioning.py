"""How a UNet is conditioned, and the non-text conditioning encoders (class labels, spatial maps).

* `CONDITIONING_KEYS` and `unet_inputs`: how a condition enters the UNet (CompVis DiffusionWrapper's
  `conditioning_key`: concatenated to z_t, as cross-attention context, as a class/ADM vector y);
  `Conditioning` holds the three inputs. A new way in is a key here and a branch in `unet_inputs`.
* `ClassEmbedder`: class labels [B] -> [B, 1, D] cross-attention context (CompVis ClassEmbedder).
  The classifier-free-guidance null class is the last index (`null_label`, e.g. 1000 of 1001 for
  cin256-v2); with `ucg_rate` > 0 training replaces labels by it with that probability.
* `SpatialRescaler`: resizes a map n_stages times by `multiplier` exactly as torch
  `F.interpolate(x, scale_factor=multiplier, mode=method)` (output size floor(size * multiplier),
  source coordinates from the scale factor, not from the size ratio, no antialiasing), then an
  optional 1x1 conv. `jax.image.resize` differs (it antialiases when shrinking and uses the size
  ratio), so the resize is written as two small interpolation matrices built on the host.
Modules are built from a model config by `ldm_jax.models.build.build_cond_stage`; CompVis YAML
`cond_stage_config`s are translated by `ldm_jax.convert.compvis_config`.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


Dtype = Any

# Every conditioning_key a model may have. 'hybrid' is concat + cross-attention; 'hybrid-adm' adds a
# class label y (the x4 upscaler's noise level).
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm")
_CONCAT_KEYS = ("concat", "hybrid", "hybrid-adm")
_CONTEXT_KEYS = ("crossattn", "hybrid", "hybrid-adm")
_Y_KEYS = ("adm", "hybrid-adm")


@dataclasses.dataclass
class Conditioning:
  """What the UNet is conditioned on; any field may be None. A pytree, so it passes through jit."""
  context: jax.Array | None = None  # [B, L, D] for cross-attention
  concat: jax.Array | None = None   # [B, h, w, c] concatenated to z_t on channels
  y: jax.Array | None = None        # [B] class labels or [B, adm] vectors for 'adm'


jax.tree_util.register_dataclass(Conditioning, data_fields=["context", "concat", "y"],
                                 meta_fields=[])


def check_conditioning_key(key, field: str = "model.diffusion.conditioning_key") -> None:
  if key not in CONDITIONING_KEYS:
    raise ValueError(f"{field}={key!r}; expected one of {CONDITIONING_KEYS}.")


def takes_concat(key) -> bool:
  """Whether a model with this conditioning_key concatenates a condition to z_t."""
  return key in _CONCAT_KEYS


def takes_context(key) -> bool:
  """Whether a model with this conditioning_key reads a cross-attention context."""
  return key in _CONTEXT_KEYS


def takes_y(key) -> bool:
  """Whether a model with this conditioning_key reads a class label / ADM vector y."""
  return key in _Y_KEYS


def unet_inputs(key, z_t, cond: Conditioning):
  """(x, context, y) for `UNet.__call__(x, t, context, y)`, routed as the CompVis
  DiffusionWrapper does: x is z_t [B, h, w, C], or [B, h, w, C + c] with cond.concat appended."""
  x = z_t
  if takes_concat(key):
    x = jnp.concatenate([z_t, cond.concat.astype(z_t.dtype)], axis=-1)  # [B, h, w, C + c]
  context = cond.context if takes_context(key) else None
  y = cond.y if takes_y(key) else None
  return x, context, y


def null_label(n_classes: int) -> int:
  """The classifier-free-guidance null class of a class embedder: the last index."""
  return n_classes - 1


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
    return null_label(self.n_classes)

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
