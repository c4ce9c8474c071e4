"""Sample-and-evaluate: draw N samples from a model and score them (FID / IS / precision-recall).

Used by `evaluate.py samples` and by the training hook (train/eval_hook.py). It sits above the
sampler (ldm_jax/sampling.py) and beside `LatentDiffusion`; the metrics come from `image_sets`.
Impossible settings raise `ldm_jax.errors.InputError` naming the setting as the caller spells it.
"""

import dataclasses
import os
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import InputError
from ldm_jax.eval import image_sets


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How `evaluate_model` samples (the sampler arguments of `ldm_jax.sampling.sample`)."""
  num_samples: int = 50
  sampler: str = sampling_settings.DEFAULTS["sampler"]  # One of diffusion.samplers.NAMES.
  steps: int = sampling_settings.DEFAULTS["steps"]
  eta: float = 0.0
  guidance: float = sampling_settings.DEFAULTS["guidance"]
  seed: int = 0
  batch_size: int = 16
  prompts: tuple[str, ...] = ()   # Text models: cycled over the samples.
  labels: tuple[int, ...] = ()    # Class models: cycled; empty = every class in turn.


def check_settings(s: SampleSettings, model, prefix: str = "--") -> None:
  """An InputError naming the first impossible setting (prefix: '--' for flags, 'config.eval.')."""
  if s.num_samples < 1:
    raise InputError(f"{prefix}num_samples={s.num_samples}: expected >= 1.")
  if s.batch_size < 1:
    raise InputError(f"{prefix}batch_size={s.batch_size}: expected >= 1.")
  sampling_settings.check(
      {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "guidance": s.guidance,
       "seed": s.seed}, prefix=prefix, timesteps=int(model.config.diffusion.timesteps),
      num_samples=s.num_samples)
  if s.labels and model.cond_kind != "class":
    raise InputError(f"{prefix}class_label was given, but this model is conditioned by "
                     f"'{model.cond_kind}', not class labels.")
  if s.prompts and not model.is_text:
    raise InputError(f"{prefix}prompt was given, but this model is conditioned by "
                     f"'{model.cond_kind}', not text.")
  if model.is_text and not s.prompts:
    raise InputError(f"this is a text-conditional model: give {prefix}prompt or "
                     f"{prefix}prompt_file.")
  if model.cond_kind not in ("none", "class") and not model.is_text:
    raise InputError(f"sample-and-evaluate needs an unconditional, class or text model; this one is "
                     f"conditioned by '{model.cond_kind}': score a super-resolution, inpainting "
                     f"or semantic model against ground truth with `paired`, or its samples with "
                     f"`folder`.")


def sample_conditions(model, s: SampleSettings, start: int, count: int) -> dict[str, list]:
  """The prompts / labels of samples start .. start + count - 1 (cycled)."""
  idx = range(start, start + count)
  if model.is_text:
    return {"prompts": [s.prompts[i % len(s.prompts)] for i in idx]}
  if model.cond_kind == "class":
    if s.labels:
      return {"labels": [s.labels[i % len(s.labels)] for i in idx]}
    n = int(model.cond_stage_config.get("kwargs", {}).get("n_classes", 2))
    classes = max(n - 1, 1)  # The last class is the null label of guided models (as train/samples).
    return {"labels": [i % classes for i in idx]}
  return {}


def generate(model, s: SampleSettings, show_progress: bool = True,
             mesh=None) -> Iterator[np.ndarray]:
  """Yields s.num_samples uint8 [H, W, 3] samples; sample i comes from seed s.seed + i.

  The last batch is filled up with extra seeds and cut, so every batch reuses one compilation.
  mesh: split each batch over its batch axes (see `sampling.sample`).
  """
  batches = range(0, s.num_samples, s.batch_size)
  for start in image_sets.progress(batches, len(batches), f"sampling ({s.batch_size}/batch)", show_progress):
    keep = min(s.batch_size, s.num_samples - start)
    images = sampling.sample(model, sampler=s.sampler, steps=s.steps, eta=s.eta,
                             guidance=s.guidance,
                             seeds=[s.seed + start + i for i in range(s.batch_size)], mesh=mesh,
                             **sample_conditions(model, s, start, s.batch_size))
    yield from ldm_lib.to_uint8(images[:keep])


def evaluate_model(model, settings: SampleSettings, extractor,
                   reference: image_sets.Reference | None, *,
                   is_splits: int = 10, pr_k: int = 3, save_dir: str | None = None,
                   show_progress: bool = True, mesh=None) -> dict[str, Any]:
  """Samples `settings.num_samples` images and returns their FID / IS / precision-recall.

  save_dir: also write every sample as a PNG there (000000.png, ...).
  mesh: sample on it (see `generate`).
  """
  images = generate(model, settings, show_progress, mesh)
  if save_dir:
    images = _saving(images, save_dir)
  features = extractor(images, outputs=("pool", "logits_unbiased"))
  return image_sets.set_metrics(features, reference, is_splits=is_splits, pr_k=pr_k)


def _saving(images: Iterable[np.ndarray], out_dir: str) -> Iterator[np.ndarray]:
  os.makedirs(out_dir, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out_dir, f"{i:06d}.png"))
    yield image

