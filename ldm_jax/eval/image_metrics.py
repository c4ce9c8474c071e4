"""Per-image reconstruction metrics: PSNR and SSIM (the first-stage table's columns), in JAX.

Both take two batches [B, H, W, C] on the same scale (uint8 0..255 or floats) and the `data_range`
of that scale (255 for uint8, 2 for [-1, 1], 1 for [0, 1]), and return one value per image [B].

  PSNR = 10 log10(data_range^2 / MSE), MSE over all pixels and channels of the image
         (scikit-image's `peak_signal_noise_ratio`; identical images give +inf).
  SSIM = Wang et al. 2004: 11x11 Gaussian window (sigma 1.5, cut at 3.5 sigma), population
         (co)variances, K1 = 0.01, K2 = 0.03, the map averaged over the pixels whose window lies
         inside the image, then over channels (scikit-image's `structural_similarity` with
         gaussian_weights=True, sigma=1.5, use_sample_covariance=False).

Computation is float32. Second moments are taken about each image's global mean, which the
(co)variances do not depend on, so they do not lose digits to E[x^2] - E[x]^2 cancellation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # Window radius = int(3.5 * 1.5 + 0.5) = 5, i.e. 11 taps, as Wang et al.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x, y, what: str) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"{what}: images of shapes {tuple(x.shape)} and {tuple(y.shape)}; expected "
                     "two equal [B, H, W, C] batches.")


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """The normalised 1-D Gaussian of scipy.ndimage.gaussian_filter: [2r + 1], r = int(t*s + 0.5)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("data_range",))
def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
  """PSNR in dB of each image pair: x, y [B, H, W, C] -> [B] (+inf where they are equal)."""
  _check_pair(x, y, "psnr")
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)  # [B, H, W, C]
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))  # [B]
  return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def _filter_valid(images: jax.Array, window: jax.Array) -> jax.Array:
  """Separable Gaussian filter, 'valid' only: [N, H, W, C] -> [N, H - 2r, W - 2r, C].

  The 'valid' region is exactly the part of a padded filter's output that SSIM keeps (the crop of
  the window radius), so no padding mode is needed.
  """
  n, h, w, c = images.shape
  taps = window.shape[0]
  # Channels become batch entries: each is filtered on its own.
  x = jnp.transpose(images, (0, 3, 1, 2)).reshape(n * c, h, w, 1)  # [N*C, H, W, 1]
  dn = ("NHWC", "HWIO", "NHWC")
  hp = jax.lax.Precision.HIGHEST  # Accelerators default to reduced-precision convolutions.
  x = jax.lax.conv_general_dilated(x, window.reshape(taps, 1, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dn, precision=hp)  # [N*C, H-2r, W, 1]
  x = jax.lax.conv_general_dilated(x, window.reshape(1, taps, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dn, precision=hp)  # [N*C, H-2r, W-2r, 1]
  return jnp.transpose(x.reshape(n, c, h - taps + 1, w - taps + 1), (0, 2, 3, 1))


@functools.partial(jax.jit, static_argnames=("data_range",))
def ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
  """Mean SSIM of each image pair: x, y [B, H, W, C] (H, W >= 11) -> [B] in [-1, 1]."""
  _check_pair(x, y, "ssim")
  window = jnp.asarray(gaussian_window())
  if min(x.shape[1:3]) < window.shape[0]:
    raise ValueError(f"ssim: images of {x.shape[2]}x{x.shape[1]} px; the Gaussian window needs "
                     f"at least {window.shape[0]}x{window.shape[0]}.")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  # Local means of the raw images (the luminance term), local second moments of the centred ones.
  xc = x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)  # [B, H, W, C]
  yc = y - jnp.mean(y, axis=(1, 2, 3), keepdims=True)
  stacked = jnp.concatenate([x, y, xc, yc, xc * xc, yc * yc, xc * yc], axis=0)  # [7B, H, W, C]
  ux, uy, uxc, uyc, uxx, uyy, uxy = jnp.split(_filter_valid(stacked, window), 7)  # [B, h, w, C]
  vx = uxx - uxc * uxc
  vy = uyy - uyc * uyc
  vxy = uxy - uxc * uyc
  s = ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))  # [B]; equal pixel counts: mean over pixels, then channels
