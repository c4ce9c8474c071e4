"""PSNR and SSIM against scikit-image on real photos (skimage.data) with common distortions."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_jax.eval import image_metrics


def _photos(size: int = 96) -> np.ndarray:
  """Three real photos, centre-cropped and resized to size x size: uint8 [3, size, size, 3]."""
  out = []
  for name in ("astronaut", "coffee", "chelsea"):
    im = Image.fromarray(getattr(skdata, name)())
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size),
                                                                          Image.BICUBIC)))
  return np.stack(out)


def _distort(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  if kind == "noise":
    return np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
  if kind == "blur":
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.5)))
                     for im in images])
  if kind == "jpeg":
    out = []
    for im in images:
      buf = io.BytesIO()
      Image.fromarray(im).save(buf, "JPEG", quality=15)
      out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out)
  if kind == "brighter":
    return np.clip(images.astype(np.int32) + 40, 0, 255).astype(np.uint8)
  raise ValueError(kind)


@pytest.fixture(scope="module")
def photos():
  return _photos()


@pytest.mark.parametrize("kind", ["noise", "blur", "jpeg", "brighter"])
def test_uint8_matches_skimage(photos, kind):
  distorted = _distort(photos, kind, np.random.default_rng(0))
  got_psnr = np.asarray(image_metrics.psnr(photos, distorted, data_range=255.0))
  got_ssim = np.asarray(image_metrics.ssim(photos, distorted, data_range=255.0))
  for i in range(len(photos)):
    want_psnr = peak_signal_noise_ratio(photos[i], distorted[i], data_range=255)
    want_ssim = structural_similarity(photos[i], distorted[i], data_range=255, channel_axis=-1,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    np.testing.assert_allclose(got_psnr[i], want_psnr, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got_ssim[i], want_ssim, rtol=0, atol=2e-5)
  # The distortions are real ones: the metrics must see them.
  assert np.all(got_ssim < 0.99) and np.all(got_psnr < 40)


def test_float_scale_matches_skimage(photos):
  """[-1, 1] floats with data_range=2 (the model's scale) give the uint8 values' metrics."""
  rng = np.random.default_rng(1)
  x = photos.astype(np.float32) / 127.5 - 1.0
  y = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1).astype(np.float32)
  got_psnr = np.asarray(image_metrics.psnr(x, y, data_range=2.0))
  got_ssim = np.asarray(image_metrics.ssim(x, y, data_range=2.0))
  for i in range(len(x)):
    want_ssim = structural_similarity(x[i].astype(np.float64), y[i].astype(np.float64),
                                      data_range=2.0, channel_axis=-1, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(got_psnr[i], peak_signal_noise_ratio(x[i], y[i], data_range=2.0),
                               atol=2e-4)
    np.testing.assert_allclose(got_ssim[i], want_ssim, atol=2e-5)


def test_grayscale_non_square(photos):
  """One channel, a non-square image: the window crop runs along each axis separately."""
  cam = skdata.camera()[100:164, 50:150, None]  # [64, 100, 1]
  rng = np.random.default_rng(2)
  noisy = np.clip(cam + rng.normal(0, 20, cam.shape), 0, 255).astype(np.uint8)
  got = float(image_metrics.ssim(cam[None], noisy[None], data_range=255.0)[0])
  want = structural_similarity(cam[..., 0], noisy[..., 0], data_range=255, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_closed_forms(photos):
  x = photos[:1]
  assert float(image_metrics.ssim(x, x, data_range=255.0)[0]) == pytest.approx(1.0, abs=1e-6)
  assert np.isinf(float(image_metrics.psnr(x, x, data_range=255.0)[0]))
  # A uniform error of e levels: MSE = e^2, so PSNR = 20 log10(255 / e).
  y = x.astype(np.float32) + 5.0
  assert float(image_metrics.psnr(x, y, data_range=255.0)[0]) == pytest.approx(
      20 * np.log10(255 / 5), abs=1e-4)
  # The Gaussian window is scipy.ndimage's 11-tap kernel.
  from scipy import ndimage
  impulse = np.zeros(21)
  impulse[10] = 1.0
  np.testing.assert_allclose(image_metrics.gaussian_window(),
                             ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16], atol=1e-7)


def test_bad_inputs(photos):
  with pytest.raises(ValueError, match="expected two equal"):
    image_metrics.psnr(photos, photos[:, :, :-1], data_range=255.0)
  with pytest.raises(ValueError, match="at least 11x11"):
    image_metrics.ssim(photos[:, :8, :8], photos[:, :8, :8], data_range=255.0)
