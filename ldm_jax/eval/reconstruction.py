"""First-stage evaluation: reconstruct images through an autoencoder; PSNR, SSIM, LPIPS and rFID.

The columns of the paper's first-stage table. Reconstructions are deterministic (the KL posterior's
mode; VQ: the nearest codes), clipped to [-1, 1] and rounded to uint8 as a saved image would be;
PSNR and SSIM compare uint8 images (data range 255), LPIPS(vgg) the float images, and rFID is the
FID between the reconstructions and their inputs. `evaluate.py autoencoder` drives it, with a first
stage loaded by `model_io.load_first_stage` (or `load_compvis_first_stage`).
"""

import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import InputError
from ldm_jax.eval import fid
from ldm_jax.eval import image_metrics
from ldm_jax.models import lpips as lpips_lib


@functools.partial(jax.jit, static_argnums=(0,))
def reconstruct(module, variables, images):
  """[B, H, W, 3] in [-1, 1] -> reconstructions, deterministically: the KL posterior's mode, or
  the VQ code nearest to the encoding (the first stage as the LDM sees it)."""
  if hasattr(module, "quantize"):
    h = module.apply(variables, images, method=module.encode)
    return module.apply(variables, h, method=module.decode)
  posterior = module.apply(variables, images, method=module.encode)
  return module.apply(variables, posterior.mode(), method=module.decode)


def evaluate_autoencoder(module, variables, images: Iterable[np.ndarray], count: int, *,
                         batch_size: int, extractor=None, lpips_params=None,
                         progress: Callable[..., Iterable] | None = None) -> dict[str, Any]:
  """PSNR / SSIM (uint8, data range 255), LPIPS and rFID of reconstructions of `images` (uint8
  [H, W, 3], all one size); LPIPS needs lpips_params, rFID the Inception extractor."""
  lpips = lpips_lib.lpips_fn(lpips_params) if lpips_params is not None else None
  sums: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
  pools: dict[str, list[np.ndarray]] = {"real": [], "rec": []}
  factor = 2 ** (len(module.ch_mult) - 1)
  batches = _batched(images, batch_size, factor)
  if progress is not None:  # progress(iterable, total, desc), e.g. image_sets.progress
    batches = progress(batches, -(-count // batch_size), "reconstructing")
  for batch in batches:
    n = len(batch)
    padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])  # one compilation
    x = jnp.asarray(padded, jnp.float32) / 127.5 - 1.0  # [B, H, W, 3]
    rec = jnp.clip(reconstruct(module, variables, x), -1.0, 1.0)
    rec_u8 = np.asarray(jnp.round((rec + 1.0) * 127.5), np.uint8)[:n]  # as it would be saved
    sums["psnr"].append(np.asarray(image_metrics.psnr(batch, rec_u8, data_range=255.0)))
    sums["ssim"].append(np.asarray(image_metrics.ssim(batch, rec_u8, data_range=255.0)))
    if lpips is not None:
      sums["lpips"].append(np.asarray(lpips(x, rec))[:n])
    if extractor is not None:  # One call for both halves: fewer, fuller Inception batches.
      pool = extractor(np.concatenate([batch, rec_u8]), outputs=("pool",))["pool"]  # [2n, 2048]
      pools["real"].append(pool[:n])
      pools["rec"].append(pool[n:])
  out: dict[str, Any] = {"num_images": int(sum(len(v) for v in sums["psnr"]))}
  for name, values in sums.items():
    if values:
      v = np.concatenate(values)
      out[name], out[name + "_std"] = float(np.mean(v)), float(np.std(v))
  if extractor is not None:
    real, rec = (np.concatenate(pools[k]) for k in ("real", "rec"))
    out["rfid"] = float(fid.frechet_distance(*fid.feature_statistics(rec),
                                             *fid.feature_statistics(real), features1=rec))
  return out


def _batched(images: Iterable[np.ndarray], batch_size: int, factor: int) -> Iterator[np.ndarray]:
  batch = []
  for image in images:
    if image.shape[0] % factor or image.shape[1] % factor:
      raise InputError(f"an image of {image.shape[1]}x{image.shape[0]} px: the first stage needs "
                       f"multiples of its factor {factor}; resize or crop the images to fit.")
    if batch and image.shape != batch[0].shape:
      raise InputError(f"images of sizes {batch[0].shape[:2]} and {image.shape[:2]} in one set; "
                       "expected one size (centre-crop them all to one size).")
    batch.append(image)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)
