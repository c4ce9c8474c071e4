"""Inception features and metrics of image sets: the extractor, references, FID / IS / P-R.

The library beneath `evaluate.py` and the training hook: a reference is a statistics .npz, an image
folder or a TFDS split (tfds:NAME[:SPLIT]); `set_metrics` turns the features of a set of samples
into FID (2048-d pool features), IS (1008 bias-free logits, 10 splits) and improved
precision/recall (k = 3), against a reference when one is given.

Settings are named by the caller (`field`, `flag`: '--inception' on the command line,
'config.eval.inception' in a config), so every error names what the user wrote. Mistakes raise
`ldm_jax.errors.InputError`.
"""

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from ldm_jax import parallel
from ldm_jax.convert import common
from ldm_jax.convert import inception as inception_convert
from ldm_jax.data import transforms
from ldm_jax.data.folder import ImageFolderSource
from ldm_jax.data.tfds_source import TfdsSource
from ldm_jax.errors import InputError
from ldm_jax.eval import fid
from ldm_jax.eval import inception_score
from ldm_jax.eval import precision_recall


# ------------------------------------------------------------------------------------------------
# Progress bars.
# ------------------------------------------------------------------------------------------------
def _printed(iterable: Iterable, total: int | None, desc: str, every_sec: float = 10.0):
  """A plain progress printer (stderr) for when tqdm is not installed."""
  start = last = time.time()
  count = 0
  for count, item in enumerate(iterable, 1):
    yield item
    if time.time() - last >= every_sec:
      last = time.time()
      print(f"{desc}: {count}/{total or '?'} ({last - start:.0f} s)", file=sys.stderr, flush=True)
  print(f"{desc}: {count} done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)


def progress(iterable: Iterable, total: int | None, desc: str, enabled: bool = True) -> Iterable:
  if not enabled:
    return iterable
  try:
    import tqdm  # Optional.
  except ImportError:
    return _printed(iterable, total, desc)
  return tqdm.tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------
# Inputs: the Inception, image sources, references.
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def load_extractor(path: str, batch_size: int, num_devices: int = 0, *,
                   field: str = "inception", devices_field: str = "num_devices"):
  """The FID Inception feature extractor for converted weights (.npz) or a pt_inception .pth.

  num_devices: shard batches over the first N local devices (0 = all). Cached per arguments, so
  repeated evaluations (the training hook) compile once. field / devices_field: how the caller
  names the two settings in errors ('--inception', 'config.eval.inception').
  """
  if not path:
    raise InputError(f"{field} is required: the FID Inception weights (.npz from `python -m "
                     "ldm_jax.convert.inception`, or the pt_inception .pth).")
  try:
    params = inception_convert.load_inception_params(path)
  except (FileNotFoundError, common.WeightLoadError, OSError, ValueError) as e:
    raise InputError(f"{field}={path}: {' '.join(str(e).split())}") from None
  devices = jax.local_devices()
  if not 0 <= num_devices <= len(devices):
    raise InputError(f"{devices_field}={num_devices}: expected 0 (all) or 1..{len(devices)}.")
  mesh = None
  if num_devices:
    mesh = parallel.make_mesh({"data": num_devices}, devices=devices[:num_devices])
  return fid.InceptionFeatureExtractor(params, batch_size=batch_size, mesh=mesh)


def reference_kind(spec: str, flag: str = "--reference") -> str:
  """'stats' (an .npz), 'folder' or 'tfds' (tfds:NAME[:SPLIT]); an InputError otherwise."""
  if spec.startswith("tfds:") and len(spec) > 5:
    return "tfds"
  if os.path.isdir(spec):
    return "folder"
  if spec.endswith(".npz") and os.path.isfile(spec):
    return "stats"
  raise InputError(f"{flag}={spec}: expected an existing image folder, a statistics .npz file or "
                   f"tfds:NAME[:SPLIT].")


def open_source(spec: str, data_dir: str | None, flag: str, *, maps_classes: int = 0):
  """A random-access image source (records with 'image' uint8 [H, W, 3]) for a folder or TFDS.

  maps_classes: > 0 reads a folder's segmentation maps (root/maps/, class indices below it) into
    each record's 'segmentation' int32 [H, W].
  """
  kind = reference_kind(spec, flag)
  try:
    if kind == "folder":
      if maps_classes:
        return ImageFolderSource(spec, verify=False, maps=True, num_classes=maps_classes)
      return ImageFolderSource(spec, verify=False)
    if kind == "tfds":
      name, _, split = spec[5:].partition(":")
      return TfdsSource(name, split or "train", data_dir or None)
  except (ValueError, FileNotFoundError) as e:
    raise InputError(f"{flag}={spec}: {e}") from None
  raise InputError(f"{flag}={spec}: a statistics file holds no images; expected a folder or "
                   "tfds:NAME[:SPLIT].")


def center_resize(image: np.ndarray, size: int | None) -> np.ndarray:
  """Shorter side to `size` (bicubic), then the centre size x size crop; None: unchanged."""
  if not size:
    return image
  image = transforms.resize_shorter(image, size)  # [H', W', 3]
  top, left = transforms.crop_offsets(image.shape[0], image.shape[1], size, None)
  return image[top:top + size, left:left + size]


def iter_images(source, count: int, size: int | None) -> Iterator[np.ndarray]:
  for i in range(count):
    yield center_resize(source[i]["image"], size)


def count(source, max_images: int | None) -> int:
  return len(source) if not max_images else min(len(source), int(max_images))


@dataclasses.dataclass
class Reference:
  """A reference's FID statistics, plus its pool features when precision/recall needs them."""
  spec: str
  mu: np.ndarray
  sigma: np.ndarray
  pool: np.ndarray | None = None  # [N, 2048]
  count: int | None = None


def load_reference(spec: str, extractor, *, need_features: bool, max_images: int | None = None,
                   image_size: int | None = None, data_dir: str | None = None,
                   cache_dir: str | None = None, show_progress: bool = True,
                   pr_k: int = 0, field: str = "--reference") -> Reference:
  """Statistics (and features) of a reference: a stats .npz, an image folder or a TFDS split.

  Without features, `fid.reference_statistics` computes (and caches in cache_dir) the statistics;
  with them (precision/recall), the images are read here and their pool features kept. image_size:
  resize the shorter side and centre-crop, as the training pipeline. pr_k: fail before any work
  when the reference has too few images for precision/recall with this k. field: how the caller
  names the reference in errors.
  """
  kind = reference_kind(spec, field)
  if kind == "stats":
    try:
      mu, sigma = fid.load_stats(spec)
    except (KeyError, ValueError, OSError) as e:
      raise InputError(f"{field}={spec}: not a statistics file with 'mu' and 'sigma' "
                       f"({e}).") from None
    return Reference(spec, mu, sigma)
  if not need_features:
    mu, sigma = fid.reference_statistics(spec, extractor, max_images=max_images or None,
                                         image_size=image_size or None,
                                         cache_dir=cache_dir or None, data_dir=data_dir or None)
    return Reference(spec, mu, sigma)
  source = open_source(spec, data_dir, field)
  n = count(source, max_images)
  check_pr_count(pr_k, n, "reference images")
  images = progress(iter_images(source, n, image_size), n, "reference features", show_progress)
  pool = extractor(images, outputs=("pool",))["pool"]  # [N, 2048]
  mu, sigma = fid.feature_statistics(pool)
  return Reference(spec, mu, sigma, pool=pool, count=len(pool))


def check_pr_count(pr_k: int, n: int, what: str) -> None:
  """Precision/recall with k neighbours needs more than k images on each side."""
  if pr_k and n <= pr_k:
    raise InputError(f"precision/recall with k={pr_k} needs more than {pr_k} {what} (got {n}); "
                     "use more images or pr_k=0.")


# ------------------------------------------------------------------------------------------------
# Metrics of an image set.
# ------------------------------------------------------------------------------------------------
def set_metrics(features: dict[str, np.ndarray], reference: Reference | None, *,
                is_splits: int = 10, pr_k: int = 3) -> dict[str, Any]:
  """FID, IS and precision/recall of sample features {'pool', 'logits_unbiased'} [N, ...]."""
  pool = features["pool"]
  n = len(pool)
  out: dict[str, Any] = {"num_samples": n}
  splits = max(1, min(is_splits, n))
  out["inception_score"], out["inception_score_std"] = inception_score.inception_score(
      features["logits_unbiased"], splits=splits)
  out["is_splits"] = splits
  if reference is None:
    return out
  with_pr = bool(pr_k) and reference.pool is not None
  if with_pr:  # Before the (slow) FID.
    check_pr_count(pr_k, n, "samples")
    check_pr_count(pr_k, len(reference.pool), "reference images")
  if n < 2:
    raise InputError(f"FID needs at least 2 samples (got {n}).")
  mu, sigma = fid.feature_statistics(pool)
  out["fid"] = float(fid.frechet_distance(mu, sigma, reference.mu, reference.sigma,
                                           features1=pool))
  out["num_reference"] = reference.count
  if with_pr:
    pr = precision_recall.precision_recall(reference.pool, pool, k=pr_k)
    out.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr_k)
  return out


def write_result(path: str, result: dict) -> None:
  """A result record as JSON (values JSON cannot hold written as text), directories created."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=str)

