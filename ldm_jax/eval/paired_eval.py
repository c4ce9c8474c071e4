"""Paired evaluation of concat-conditioned models against the images their conditions came from.

For each ground-truth image the model's condition is built from the image itself, the model samples
from it, and the output is compared with the image, as the paper's super-resolution (Tab. 5) and
inpainting (Tab. 7) tables do:
- super-resolution (cond 'identity', concat): the image degraded and downsampled by the first
  stage's factor, bicubic or BSR (`data/transforms.py`), as the training pipeline makes it;
- inpainting (cond 'first_stage'): holes drawn by the training mask generators (box, stroke or
  mixed), the masked image and the mask; the known pixels are pasted back, as a user would see it;
- semantic synthesis (cond 'spatial_rescaler'): the record's `segmentation` map (class indices
  [H, W], from a source that yields maps), one-hot over the model's input classes.

Metrics: per image PSNR and SSIM on uint8 (data range 255, `image_metrics`) and LPIPS(vgg) on
the same images in [-1, 1], mean and std; over the set, FID of the outputs against the ground-truth
images and IS of the outputs (`image_sets.set_metrics`). The i-th image's holes and BSR noise come
from a generator seeded with i alone, so every model and sampling seed is scored on the same
inputs; its sampling noise comes from seed + i. `evaluate.py paired` drives it.
"""

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from PIL import Image

from ldm_jax import sampling
from ldm_jax.data import transforms
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import InputError
from ldm_jax.eval import fid
from ldm_jax.eval import image_metrics
from ldm_jax.eval import image_sets
from ldm_jax.models import conditioning
from ldm_jax.models import lpips as lpips_lib

SUPER_RESOLUTION, INPAINTING, SEMANTIC = "super_resolution", "inpainting", "semantic"
DEGRADATIONS = transforms.DEGRADATIONS
MASKS = ("box", "stroke", "mixed")
# The record key of a source's segmentation map (int class indices [H, W]).
SEGMENTATION = "segmentation"


@dataclasses.dataclass(frozen=True)
class PairedSettings:
  """How `evaluate_paired` builds the conditions and samples."""
  sampler: str = sampling_settings.DEFAULTS["sampler"]  # One of diffusion.samplers.NAMES.
  steps: int = sampling_settings.DEFAULTS["steps"]
  eta: float = 0.0
  seed: int = 0                 # Output i samples from seed + i.
  batch_size: int = 16
  degradation: str = "bicubic"  # Super-resolution: one of DEGRADATIONS.
  masks: str = "box"            # Inpainting: one of MASKS.


def paired_task(model) -> str:
  """The paired task of a model whose condition is made from the image; InputError otherwise."""
  kind, key = model.cond_kind, model.config.diffusion.conditioning_key
  # The text family's inpainting, x4 upscaler and depth models also need a prompt: not paired here.
  if not (model.is_text or model.is_upscaler or model.is_depth):
    if kind == "first_stage":
      return INPAINTING
    if kind == "spatial_rescaler":
      return SEMANTIC
    if kind == "identity" and conditioning.takes_concat(key):
      return SUPER_RESOLUTION
  raise InputError(f"paired evaluation needs a model conditioned on an image made from the ground "
                   f"truth (super-resolution, inpainting or semantic synthesis); this one is "
                   f"conditioned by '{kind}' (conditioning_key {key!r}): score its samples with "
                   f"`samples` or `folder`.")


def check_settings(s: PairedSettings, model, num_images: int, prefix: str = "--") -> str:
  """An InputError naming the first impossible setting; returns the model's paired task."""
  task = paired_task(model)
  if s.batch_size < 1:
    raise InputError(f"{prefix}batch_size={s.batch_size}: expected >= 1.")
  sampling_settings.check({"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "seed": s.seed},
                          prefix=prefix, timesteps=int(model.config.diffusion.timesteps),
                          num_samples=max(num_images, 1))
  if s.degradation not in DEGRADATIONS:
    raise InputError(f"{prefix}degradation={s.degradation!r}: expected one of "
                     f"{list(DEGRADATIONS)}.")
  if s.masks not in MASKS:
    raise InputError(f"{prefix}masks={s.masks!r}: expected one of {list(MASKS)}.")
  return task


def _example_rng(index: int) -> np.random.Generator:
  return np.random.default_rng(index)


def lowres(image: np.ndarray, factor: int, degradation: str, index: int) -> np.ndarray:
  """uint8 [H, W, 3] -> the super-resolution input uint8 [H/f, W/f, 3] of example `index`."""
  return transforms.degrade(image, factor, degradation, _example_rng(index))


def inpaint_mask(size: int, masks: str, index: int) -> np.ndarray:
  """The keep-mask float32 [size, size, 1] (1 = keep, 0 = hole) of example `index`, drawn by the
  training pipeline's mask generator."""
  blank = {"image": np.zeros((size, size, 3), np.float32)}
  return transforms.InpaintTransform(kind=masks)(blank, _example_rng(index))["mask"]


def one_hot_map(seg: np.ndarray, classes: int, where: str) -> np.ndarray:
  """Class indices int [H, W] -> float32 one-hot [H, W, classes]; InputError for a class out of
  range (`where` names the example)."""
  seg = np.asarray(seg)
  if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() >= classes:
    raise InputError(f"{where}: segmentation map of shape {seg.shape} with classes "
                     f"{int(seg.min()) if seg.size else None}..{int(seg.max()) if seg.size else None}"
                     f"; expected [H, W] class indices in [0, {classes}) (the model's input "
                     f"classes).")
  return np.eye(classes, dtype=np.float32)[seg]


def map_classes(model) -> int:
  """The classes of a semantic-synthesis model's segmentation maps (its condition's channels)."""
  return int(model.cond_stage_config.get("kwargs", {}).get("in_channels", 0))


def condition_inputs(model, task: str, truth: np.ndarray, records: list[dict], start: int,
                     s: PairedSettings) -> dict[str, np.ndarray]:
  """`sampling.sample` keyword arguments conditioning on ground truth uint8 [B, H, W, 3] (examples
  start .. start + B - 1; `records` are their source records, for maps)."""
  if task == SUPER_RESOLUTION:
    f = model.downsample_factor
    low = [lowres(im, f, s.degradation, start + i) for i, im in enumerate(truth)]
    return {"images": np.stack([transforms.to_float(x) for x in low])}  # [B, H/f, W/f, 3]
  if task == INPAINTING:
    if truth.shape[1] != truth.shape[2]:
      raise InputError(f"inpainting masks are square; images of {truth.shape[2]}x{truth.shape[1]} "
                       f"px: expected them resized and centre-cropped to a square.")
    masks = np.stack([inpaint_mask(truth.shape[1], s.masks, start + i)
                      for i in range(len(truth))])  # [B, H, W, 1]
    return {"init_image": transforms.to_float(truth), "mask": masks}
  classes = map_classes(model)
  maps = []
  for i, record in enumerate(records):
    if SEGMENTATION not in record:
      raise InputError(f"this semantic-synthesis model is conditioned on a segmentation map, but "
                       f"example {start + i} of the data has none (keys {sorted(record)}); "
                       f"expected a source that yields '{SEGMENTATION}' maps.")
    seg = np.asarray(record[SEGMENTATION])
    if seg.shape != truth.shape[1:3]:
      raise InputError(f"example {start + i}: segmentation map of shape {seg.shape}; expected the "
                       f"image's {truth.shape[1:3]} (--image_size resizes images, not maps).")
    maps.append(one_hot_map(seg, classes, f"example {start + i}"))
  return {"images": np.stack(maps)}  # [B, H, W, classes]


def pairs(model, source, count: int, s: PairedSettings, *, image_size: int | None = None,
          mesh=None, show_progress: bool = True,
          outputs_fn: Callable[..., np.ndarray] | None = None
          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (ground truth, output) uint8 [B, H, W, 3] batches for the first `count` examples.

  image_size: resize (shorter side) and centre-crop the images (None: as stored). The last batch
  is filled up with copies of its last example and cut, so every batch reuses one compilation.
  outputs_fn(truth float [B, H, W, 3] in [-1, 1], **inputs, seeds) -> outputs in [-1, 1]: what
  makes the outputs (default: the model's sampler); tests pass an oracle.
  """
  task = paired_task(model)
  if outputs_fn is None:
    def outputs_fn(truth, seeds, **inputs):
      return sampling.sample(model, height=truth.shape[1], width=truth.shape[2],
                             sampler=s.sampler, steps=s.steps, eta=s.eta, seeds=seeds, mesh=mesh,
                             **inputs)
  batches = range(0, count, s.batch_size)
  for start in image_sets.progress(batches, len(batches), f"paired ({s.batch_size}/batch)",
                                   show_progress):
    keep = min(s.batch_size, count - start)
    records = [source[start + i] for i in range(keep)]
    truth = []
    for i, record in enumerate(records):
      image = image_sets.center_resize(np.asarray(record["image"]), image_size)
      if truth and image.shape != truth[0].shape:
        raise InputError(f"example {start + i}: an image of {image.shape[1]}x{image.shape[0]} px "
                         f"after {truth[0].shape[1]}x{truth[0].shape[0]}; expected one size "
                         f"(--image_size resizes and centre-crops them all).")
      truth.append(image)
    fill = s.batch_size - keep
    truth_b = np.stack(truth + [truth[-1]] * fill)  # [B, H, W, 3]
    records_b = records + [records[-1]] * fill
    inputs = condition_inputs(model, task, truth_b, records_b, start, s)
    seeds = [s.seed + start + i for i in range(keep)] + [s.seed + start + keep - 1] * fill
    out = outputs_fn(transforms.to_float(truth_b), seeds=seeds, **inputs)
    yield truth_b[:keep], transforms.to_uint8(np.asarray(out))[:keep]


@jax.jit
def _lpips(params, x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS of image pairs [B, H, W, 3] in [-1, 1] -> [B]; the weights are an argument, so they are
  not baked into the compiled program."""
  return lpips_lib.lpips_fn(params)(x, y)


def paired_metrics(batches: Iterable[tuple[np.ndarray, np.ndarray]], *, extractor=None,
                   lpips_params=None, is_splits: int = 10,
                   save_dir: str | None = None) -> dict[str, Any]:
  """PSNR / SSIM / LPIPS (mean and std over images) of (ground truth, output) uint8 batches, and
  with the Inception extractor FID (outputs against ground truth) and IS (outputs).

  save_dir: also write every output as a PNG there (000000.png, ...).
  """
  values: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
  features: dict[str, list[np.ndarray]] = {"truth": [], "pool": [], "logits_unbiased": []}
  written = 0
  for truth, out in batches:
    values["psnr"].append(np.asarray(image_metrics.psnr(truth, out, data_range=255.0)))
    values["ssim"].append(np.asarray(image_metrics.ssim(truth, out, data_range=255.0)))
    if lpips_params is not None:
      values["lpips"].append(np.asarray(_lpips(lpips_params, transforms.to_float(truth),
                                               transforms.to_float(out))))
    if extractor is not None:  # One call for both sets: fewer, fuller Inception batches.
      n = len(out)
      f = extractor(np.concatenate([truth, out]), outputs=("pool", "logits_unbiased"))
      features["truth"].append(f["pool"][:n])
      features["pool"].append(f["pool"][n:])
      features["logits_unbiased"].append(f["logits_unbiased"][n:])
    if save_dir:
      for image in out:
        Image.fromarray(image).save(os.path.join(save_dir, f"{written:06d}.png"))
        written += 1
  result: dict[str, Any] = {"num_images": int(sum(len(v) for v in values["psnr"]))}
  for name, parts in values.items():
    if parts:
      v = np.concatenate(parts).astype(np.float64)
      with np.errstate(invalid="ignore"):  # Outputs equal to their truth: PSNR inf, std nan.
        result[name], result[name + "_std"] = float(np.mean(v)), float(np.std(v))
  if extractor is not None:
    truth_pool = np.concatenate(features["truth"])
    if len(truth_pool) < 2:
      raise InputError(f"FID needs at least 2 images (got {len(truth_pool)}).")
    mu, sigma = fid.feature_statistics(truth_pool)
    reference = image_sets.Reference("ground truth", mu, sigma, count=len(truth_pool))
    result.update(image_sets.set_metrics(
        {k: np.concatenate(features[k]) for k in ("pool", "logits_unbiased")}, reference,
        is_splits=is_splits, pr_k=0))
    result.pop("num_samples", None)  # The same as num_images.
  return result


def evaluate_paired(model, source, count: int, settings: PairedSettings, *, extractor=None,
                    lpips_params=None, image_size: int | None = None, is_splits: int = 10,
                    save_dir: str | None = None, mesh=None,
                    show_progress: bool = True) -> dict[str, Any]:
  """Samples an output for each of the first `count` examples of `source` from the condition made
  of its image, and scores the outputs against the images (see `paired_metrics`)."""
  task = check_settings(settings, model, count)
  if save_dir:
    os.makedirs(save_dir, exist_ok=True)
  metrics = paired_metrics(
      pairs(model, source, count, settings, image_size=image_size, mesh=mesh,
            show_progress=show_progress),
      extractor=extractor, lpips_params=lpips_params, is_splits=is_splits, save_dir=save_dir)
  metrics["task"] = task
  return metrics
