"""The Stable Diffusion family's extra inputs: the models, and how their concat conditions are made.

Each model is named in the config by `diffusion.model_target` (the CompVis class), and its extra
UNet input channels are built here as the originals build them, so the numbers match the
CompVis code and diffusers' pipelines:

  inpainting (LatentInpaintDiffusion)   [hole mask, masked-image latent] in `concat_keys` order
  x4 upscaler (LatentUpscaleDiffusion)  the low-res image noised to `noise_level` (also its label)
  depth (LatentDepth2ImageDiffusion)    a depth map resized to the latents, normalised to [-1, 1]

Pure functions of arrays; `LatentDiffusion` calls them with its first stage and config.
"""

import jax
import jax.numpy as jnp
import numpy as np

INPAINT_TARGET = "LatentInpaintDiffusion"
UPSCALE_TARGET = "LatentUpscaleDiffusion"
DEPTH_TARGET = "LatentDepth2ImageDiffusion"
# What Stable Diffusion's inpainting models concatenate to z_t by default, in order: the hole mask
# (1 = repaint) and the first stage's encoding of the masked image.
INPAINT_CONCAT_KEYS = ("mask", "masked_image")
# The upscaler's noise level when none is given: diffusers' StableDiffusionUpscalePipeline default.
DEFAULT_NOISE_LEVEL = 20


def nearest_to_latent(mask: jax.Array, h: int, w: int) -> jax.Array:
  """[B, H, W, 1] -> [B, h, w, 1] as torch's `interpolate` (mode 'nearest', the default that the
  original inpainting code uses): output pixel i reads input pixel floor(i * H / h)."""
  if mask.shape[1] % h or mask.shape[2] % w:
    raise ValueError(f"mask of {mask.shape[2]}x{mask.shape[1]} px: expected a multiple of the "
                     f"{w}x{h} latents.")
  return mask[:, ::mask.shape[1] // h, ::mask.shape[2] // w, :1]


def order_concat(parts: dict, keys, masked_image_key: str) -> jax.Array:
  """Concatenates {'mask', 'masked_image'} on channels in the config's `concat_keys` order."""
  out = []
  for key in keys:
    if key == masked_image_key:
      out.append(parts["masked_image"])
    elif key == "mask":
      out.append(parts["mask"])
    else:
      raise ValueError(f"model.diffusion.concat_keys={list(keys)!r}: {key!r} is neither 'mask' "
                       f"nor the masked image key {masked_image_key!r}.")
  return jnp.concatenate(out, -1)


def noise_lowres(sqrt_alphas_cumprod, alphas_cumprod, lowres, level: int, noise) -> jax.Array:
  """The upscaler's input: sqrt(a_n) x + sqrt(1 - a_n) noise under its own schedule."""
  return sqrt_alphas_cumprod[level] * lowres + jnp.sqrt(1.0 - alphas_cumprod[level]) * noise


def torch_bicubic_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """[B, H, W] -> [B, h, w] as torch's `interpolate(mode='bicubic', align_corners=False)` without
  antialiasing: Keys' cubic with a = -0.75, source i -> (i + 0.5) H / h - 0.5, edges clamped."""
  def matrix(n_in, n_out):
    a = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    f = np.floor(src)
    t = src - f
    near = lambda u: ((a + 2) * u - (a + 3)) * u * u + 1         # |u| <= 1
    far = lambda u: ((a * u - 5 * a) * u + 8 * a) * u - 4 * a    # 1 < |u| < 2
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)  # [n_out, 4]
    index = np.clip(f[:, None] + np.arange(-1, 3), 0, n_in - 1).astype(int)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 4), index.ravel()), weights.ravel())
    return m
  return np.einsum("ij,bjk,lk->bil", matrix(x.shape[1], h), x, matrix(x.shape[2], w))


def depth_concat(depth_map: np.ndarray, h: int, w: int, eps: float) -> np.ndarray:
  """A depth map [B, H, W] or [B, H, W, 1] (any scale) -> [B, h, w, 1]: bicubic resize, then per
  sample 2 (d - min) / (max - min + eps) - 1 (CompVis eps 0.001, diffusers 0)."""
  d = np.asarray(depth_map, np.float64)
  if d.ndim == 4 and d.shape[-1] == 1:
    d = d[..., 0]
  if d.ndim != 3:
    raise ValueError(f"depth map of shape {np.shape(depth_map)}: expected [B, H, W] or "
                     f"[B, H, W, 1].")
  d = torch_bicubic_resize(d, h, w)  # [B, h, w]
  lo = d.min(axis=(1, 2), keepdims=True)
  hi = d.max(axis=(1, 2), keepdims=True)
  if np.any(hi - lo + eps <= 0):
    raise ValueError("the depth map is constant: it holds no depth to condition on.")
  return (2.0 * (d - lo) / (hi - lo + eps) - 1.0).astype(np.float32)[..., None]
