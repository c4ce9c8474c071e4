"""Evaluates models and image sets with the paper's metrics; the logic behind evaluate.py.

  # Sample N images from a checkpoint, then FID / IS / precision-recall against a reference:
  python evaluate.py samples --checkpoint workdirs/shapes_ldm --num_samples 5000 --steps 50 \
      --inception fid_inception.npz --reference data/shapes_val --out results/ldm.json
  # An existing folder of samples against a reference (a folder, tfds:NAME[:SPLIT] or stats .npz):
  python evaluate.py folder --samples outputs/run1 --reference tfds:celeb_a_hq/256 \
      --inception fid_inception.npz --out results/run1.json
  # A first stage: reconstruct a dataset, PSNR / SSIM / LPIPS / rFID (the first-stage table):
  python evaluate.py autoencoder --checkpoint workdirs/shapes_ae --data data/shapes_val \
      --image_size 32 --lpips lpips_vgg.npz --inception fid_inception.npz --out results/ae.json
  # Reference statistics (mu, sigma), pytorch-fid compatible:
  python evaluate.py stats --reference tfds:lsun/church_outdoor:train --inception \
      fid_inception.npz --out church_stats.npz

Metrics: FID on the 2048-d pool features of the FID Inception (`ldm_jax.eval.fid`); IS from its
1008 bias-free logits with 10 splits; improved precision/recall with k = 3 on the pool features
(needs reference images, not a stats file); PSNR / SSIM on uint8 images; LPIPS(vgg); rFID = FID
between the reconstructions and their inputs. Every run writes a JSON file with all metrics and
settings. User mistakes end with one line on stderr and exit code 2, as sample.py.
The training hook (ldm_jax/train/eval_hook.py) runs `evaluate_model` every `config.eval.every_steps`.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from ldm_jax import sample_cli
from ldm_jax.diffusion import samplers

UserError = sample_cli.UserError  # One class, so model-loading errors from sample_cli pass through.
MODES = ("samples", "folder", "autoencoder", "stats")


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
def load_extractor(path: str, batch_size: int, num_devices: int = 0):
  """The FID Inception feature extractor for converted weights (.npz) or a pt_inception .pth.

  num_devices: shard batches over the first N local devices (0 = all). Cached per arguments, so
  repeated evaluations (the training hook) compile once.
  """
  from ldm_jax.convert import common
  from ldm_jax.convert import inception as inception_convert
  from ldm_jax.eval import fid
  if not path:
    raise UserError("--inception is required: the FID Inception weights (.npz from `python -m "
                    "ldm_jax.convert.inception`, or the pt_inception .pth).")
  try:
    params = inception_convert.load_inception_params(path)
  except (FileNotFoundError, common.WeightLoadError, OSError, ValueError) as e:
    raise UserError(f"--inception={path}: {' '.join(str(e).split())}") from None
  devices = jax.local_devices()
  if not 0 <= num_devices <= len(devices):
    raise UserError(f"--num_devices={num_devices}: expected 0 (all) or 1..{len(devices)}.")
  mesh = None
  if num_devices:
    from ldm_jax import parallel
    mesh = parallel.make_mesh({"data": num_devices}, devices=devices[:num_devices])
  return fid.InceptionFeatureExtractor(params, batch_size=batch_size, mesh=mesh)


def reference_kind(spec: str, flag: str = "--reference") -> str:
  """'stats' (an .npz), 'folder' or 'tfds' (tfds:NAME[:SPLIT]); a UserError otherwise."""
  if spec.startswith("tfds:") and len(spec) > 5:
    return "tfds"
  if os.path.isdir(spec):
    return "folder"
  if spec.endswith(".npz") and os.path.isfile(spec):
    return "stats"
  raise UserError(f"{flag}={spec}: expected an existing image folder, a statistics .npz file or "
                  f"tfds:NAME[:SPLIT].")


def open_source(spec: str, data_dir: str | None, flag: str):
  """A random-access image source (records with 'image' uint8 [H, W, 3]) for a folder or TFDS."""
  kind = reference_kind(spec, flag)
  try:
    if kind == "folder":
      from ldm_jax.data.folder import ImageFolderSource
      return ImageFolderSource(spec, verify=False)
    if kind == "tfds":
      from ldm_jax.data.tfds_source import TfdsSource
      name, _, split = spec[5:].partition(":")
      return TfdsSource(name, split or "train", data_dir or None)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"{flag}={spec}: {e}") from None
  raise UserError(f"{flag}={spec}: a statistics file holds no images; expected a folder or "
                  "tfds:NAME[:SPLIT].")


def center_resize(image: np.ndarray, size: int | None) -> np.ndarray:
  """Shorter side to `size` (bicubic), then the centre size x size crop; None: unchanged."""
  if not size:
    return image
  from ldm_jax.data import transforms
  image = transforms.resize_shorter(image, size)  # [H', W', 3]
  top, left = transforms.crop_offsets(image.shape[0], image.shape[1], size, None)
  return image[top:top + size, left:left + size]


def iter_images(source, count: int, size: int | None) -> Iterator[np.ndarray]:
  for i in range(count):
    yield center_resize(source[i]["image"], size)


def _count(source, max_images: int | None) -> int:
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
                   pr_k: int = 0) -> Reference:
  """Statistics (and features) of a reference: a stats .npz, an image folder or a TFDS split.

  Without features, `fid.reference_statistics` computes (and caches in cache_dir) the statistics;
  with them (precision/recall), the images are read here and their pool features kept. image_size:
  resize the shorter side and centre-crop, as the training pipeline. pr_k: fail before any work
  when the reference has too few images for precision/recall with this k.
  """
  from ldm_jax.eval import fid
  kind = reference_kind(spec)
  if kind == "stats":
    try:
      mu, sigma = fid.load_stats(spec)
    except (KeyError, ValueError, OSError) as e:
      raise UserError(f"--reference={spec}: not a statistics file with 'mu' and 'sigma' ({e}).")
    return Reference(spec, mu, sigma)
  if not need_features:
    mu, sigma = fid.reference_statistics(spec, extractor, max_images=max_images or None,
                                         image_size=image_size or None,
                                         cache_dir=cache_dir or None, data_dir=data_dir or None)
    return Reference(spec, mu, sigma)
  source = open_source(spec, data_dir, "--reference")
  n = _count(source, max_images)
  _check_pr_count(pr_k, n, "reference images")
  images = progress(iter_images(source, n, image_size), n, "reference features", show_progress)
  pool = extractor(images, outputs=("pool",))["pool"]  # [N, 2048]
  mu, sigma = fid.feature_statistics(pool)
  return Reference(spec, mu, sigma, pool=pool, count=len(pool))


def _check_pr_count(pr_k: int, n: int, what: str) -> None:
  if pr_k and n <= pr_k:
    raise UserError(f"precision/recall with k={pr_k} needs more than {pr_k} {what} (got {n}); "
                    "use more or --pr_k=0.")


# ------------------------------------------------------------------------------------------------
# Metrics of an image set.
# ------------------------------------------------------------------------------------------------
def set_metrics(features: dict[str, np.ndarray], reference: Reference | None, *,
                is_splits: int = 10, pr_k: int = 3) -> dict[str, Any]:
  """FID, IS and precision/recall of sample features {'pool', 'logits_unbiased'} [N, ...]."""
  from ldm_jax.eval import fid
  from ldm_jax.eval import inception_score
  from ldm_jax.eval import precision_recall
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
    _check_pr_count(pr_k, n, "samples")
    _check_pr_count(pr_k, len(reference.pool), "reference images")
  if n < 2:
    raise UserError(f"FID needs at least 2 samples (got {n}).")
  mu, sigma = fid.feature_statistics(pool)
  out["fid"] = float(fid.frechet_distance(mu, sigma, reference.mu, reference.sigma,
                                           features1=pool))
  out["num_reference"] = reference.count
  if with_pr:
    pr = precision_recall.precision_recall(reference.pool, pool, k=pr_k)
    out.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr_k)
  return out


# ------------------------------------------------------------------------------------------------
# Sample-and-evaluate.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How `evaluate_model` samples (the sampler arguments of `ldm_jax.sampling.sample`)."""
  num_samples: int = 50
  sampler: str = "ddim"  # One of ldm_jax.diffusion.samplers.NAMES.
  steps: int = 50
  eta: float = 0.0
  guidance: float = 1.0
  seed: int = 0
  batch_size: int = 16
  prompts: tuple[str, ...] = ()   # Text models: cycled over the samples.
  labels: tuple[int, ...] = ()    # Class models: cycled; empty = every class in turn.


def check_settings(s: SampleSettings, model, prefix: str = "--") -> None:
  """A UserError naming the first impossible setting (prefix: '--' for flags, 'config.eval.')."""
  if s.num_samples < 1:
    raise UserError(f"{prefix}num_samples={s.num_samples}: expected >= 1.")
  if s.batch_size < 1:
    raise UserError(f"{prefix}batch_size={s.batch_size}: expected >= 1.")
  if s.sampler not in samplers.NAMES:
    raise UserError(f"{prefix}sampler={s.sampler!r}: expected one of {list(samplers.NAMES)}.")
  t = int(model.config.diffusion.timesteps)
  if not 1 <= s.steps <= t:
    raise UserError(f"{prefix}steps={s.steps}: expected 1 <= steps <= {t}.")
  if not math.isfinite(s.guidance) or s.guidance < 0:
    raise UserError(f"{prefix}guidance={s.guidance}: expected a finite number >= 0.")
  if not math.isfinite(s.eta) or s.eta < 0:
    raise UserError(f"{prefix}eta={s.eta}: expected a finite number >= 0.")
  if s.eta != 0 and s.sampler != "ddim":
    raise UserError(f"{prefix}eta={s.eta} with sampler {s.sampler!r}: eta is a DDIM setting; "
                    f"expected 0.")
  if not 0 <= s.seed <= sample_cli.SEED_LIMIT - s.num_samples:
    raise UserError(f"{prefix}seed={s.seed}: expected 0 <= seed <= "
                    f"{sample_cli.SEED_LIMIT - s.num_samples} (sample i uses seed + i, seeds below "
                    f"2**32).")
  if s.labels and model.cond_kind != "class":
    raise UserError(f"{prefix}class_label was given, but this model is conditioned by "
                    f"'{model.cond_kind}', not class labels.")
  if s.prompts and not model.is_text:
    raise UserError(f"{prefix}prompt was given, but this model is conditioned by "
                    f"'{model.cond_kind}', not text.")
  if model.is_text and not s.prompts:
    raise UserError(f"this is a text-conditional model: give {prefix}prompt or "
                    f"{prefix}prompt_file.")
  if model.cond_kind not in ("none", "class") and not model.is_text:
    raise UserError(f"sample-and-evaluate needs an unconditional, class or text model; this one is "
                    f"conditioned by '{model.cond_kind}' (evaluate its samples with `folder`).")


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


def generate(model, s: SampleSettings, show_progress: bool = True) -> Iterator[np.ndarray]:
  """Yields s.num_samples uint8 [H, W, 3] samples; sample i comes from seed s.seed + i.

  The last batch is filled up with extra seeds and cut, so every batch reuses one compilation.
  """
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import sampling
  batches = range(0, s.num_samples, s.batch_size)
  for start in progress(batches, len(batches), f"sampling ({s.batch_size}/batch)", show_progress):
    keep = min(s.batch_size, s.num_samples - start)
    try:
      images = sampling.sample(model, sampler=s.sampler, steps=s.steps, eta=s.eta,
                               guidance=s.guidance,
                               seeds=[s.seed + start + i for i in range(s.batch_size)],
                               **sample_conditions(model, s, start, s.batch_size))
    except sampling.SamplingInputError as e:
      raise UserError(str(e)) from None
    yield from ldm_lib.to_uint8(images[:keep])


def evaluate_model(model, settings: SampleSettings, extractor, reference: Reference | None, *,
                   is_splits: int = 10, pr_k: int = 3, save_dir: str | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
  """Samples `settings.num_samples` images and returns their FID / IS / precision-recall.

  save_dir: also write every sample as a PNG there (000000.png, ...).
  """
  images = generate(model, settings, show_progress)
  if save_dir:
    images = _saving(images, save_dir)
  features = extractor(images, outputs=("pool", "logits_unbiased"))
  return set_metrics(features, reference, is_splits=is_splits, pr_k=pr_k)


def _saving(images: Iterable[np.ndarray], out_dir: str) -> Iterator[np.ndarray]:
  from PIL import Image
  os.makedirs(out_dir, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out_dir, f"{i:06d}.png"))
    yield image


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def write_result(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=str)


def _add_common(p: argparse.ArgumentParser, out_help: str) -> None:
  p.add_argument("--out", required=True, help=out_help)
  p.add_argument("--inception", default="", help="FID Inception weights: the converted .npz "
                 "(python -m ldm_jax.convert.inception) or pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--inception_batch", type=int, default=50, help="images per Inception batch")
  p.add_argument("--num_devices", type=int, default=0,
                 help="shard the Inception's batches over the first N devices (0 = all)")
  p.add_argument("--data_dir", default="", help="TFDS data_dir for tfds: specs")
  p.add_argument("--no_progress", action="store_true")


def _add_reference(p: argparse.ArgumentParser, required: bool) -> None:
  p.add_argument("--reference", required=required, default="",
                 help="an image folder, tfds:NAME[:SPLIT] or a statistics .npz (FID only)")
  p.add_argument("--max_reference", type=int, default=0, help="use the first N images (0 = all)")
  p.add_argument("--reference_size", type=int, default=0,
                 help="resize (shorter side) and centre-crop reference images to this size")
  p.add_argument("--cache_dir", default="", help="cache reference statistics here")
  p.add_argument("--is_splits", type=int, default=10, help="Inception Score splits")
  p.add_argument("--pr_k", type=int, default=3, help="precision/recall k (0 = skip)")


def parse_args(argv) -> argparse.Namespace:
  p = sample_cli.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
  s = sub.add_parser("samples", help="sample a checkpoint, then FID / IS / precision-recall")
  sample_cli.add_model_arguments(s)
  s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  s.add_argument("--num_samples", type=int, default=50)
  s.add_argument("--sampler", default="ddim", choices=samplers.NAMES)
  s.add_argument("--steps", type=int, default=50)
  s.add_argument("--eta", type=sample_cli.finite_float, default=0.0)
  s.add_argument("--guidance", type=sample_cli.finite_float, default=1.0,
                 help="classifier-free guidance scale")
  s.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
  s.add_argument("--batch_size", type=int, default=16, help="samples per sampler batch")
  s.add_argument("--prompt", action="append", help="text prompt (repeatable; cycled)")
  s.add_argument("--prompt_file", help="one prompt per line (cycled)")
  s.add_argument("--class_label", type=int, action="append",
                 help="class label (repeatable; cycled; default: every class in turn)")
  s.add_argument("--save_samples", default="", help="also write the samples as PNGs here")
  _add_reference(s, required=False)
  _add_common(s, "result JSON file")
  f = sub.add_parser("folder", help="FID / IS / precision-recall of a folder of images")
  f.add_argument("--samples", required=True, help="folder of generated images")
  f.add_argument("--max_images", type=int, default=0, help="use the first N samples (0 = all)")
  _add_reference(f, required=False)
  _add_common(f, "result JSON file")
  a = sub.add_parser("autoencoder", help="PSNR / SSIM / LPIPS / rFID of a first stage")
  a.add_argument("--checkpoint", help="autoencoder or LDM workdir, or a saved model")
  a.add_argument("--compvis_ckpt", help="a CompVis first-stage (or LDM) .ckpt")
  a.add_argument("--compvis_yaml", help="its config.yaml")
  a.add_argument("--data", required=True, help="image folder or tfds:NAME[:SPLIT]")
  a.add_argument("--image_size", type=int, default=0,
                 help="resize (shorter side) and centre-crop to this size (0 = as stored)")
  a.add_argument("--num_images", type=int, default=0, help="the first N images (0 = all)")
  a.add_argument("--batch_size", type=int, default=16)
  a.add_argument("--lpips", default="", help="LPIPS .npz (python -m ldm_jax.convert.lpips)")
  _add_common(a, "result JSON file")
  t = sub.add_parser("stats", help="write FID statistics (mu, sigma) of a dataset to an .npz")
  t.add_argument("--reference", required=True, help="an image folder or tfds:NAME[:SPLIT]")
  t.add_argument("--max_reference", type=int, default=0, help="use the first N images (0 = all)")
  t.add_argument("--reference_size", type=int, default=0,
                 help="resize (shorter side) and centre-crop to this size")
  _add_common(t, "output statistics .npz (keys mu, sigma, as pytorch-fid)")
  return p.parse_args(argv)


def _check_positive(args, *names) -> None:
  for name in names:
    value = getattr(args, name, None)
    if value is not None and value < 0:
      raise UserError(f"--{name}={value}: expected >= 0.")


def run_samples(args) -> dict:
  settings = SampleSettings(num_samples=args.num_samples, sampler=args.sampler,
                            steps=args.steps, eta=args.eta, guidance=args.guidance, seed=args.seed,
                            batch_size=args.batch_size, prompts=tuple(sample_cli.read_prompts(args)),
                            labels=tuple(args.class_label or ()))
  if args.reference and reference_kind(args.reference) != "stats":  # Fail before any work.
    _check_pr_count(args.pr_k, args.num_samples, "samples")
  extractor = load_extractor(args.inception, args.inception_batch, args.num_devices)
  model = sample_cli.load_model(args)
  check_settings(settings, model)
  reference = _reference(args, extractor)
  return evaluate_model(model, settings, extractor, reference, is_splits=args.is_splits,
                        pr_k=args.pr_k, save_dir=args.save_samples or None,
                        show_progress=not args.no_progress)


def _reference(args, extractor) -> Reference | None:
  if not args.reference:
    return None
  return load_reference(args.reference, extractor, need_features=args.pr_k > 0,
                        max_images=args.max_reference, image_size=args.reference_size,
                        data_dir=args.data_dir, cache_dir=args.cache_dir,
                        show_progress=not args.no_progress, pr_k=args.pr_k)


def run_folder(args) -> dict:
  source = open_source(args.samples, None, "--samples")
  n = _count(source, args.max_images)
  if args.reference and reference_kind(args.reference) != "stats":  # Fail before any work.
    _check_pr_count(args.pr_k, n, "samples")
  extractor = load_extractor(args.inception, args.inception_batch, args.num_devices)
  reference = _reference(args, extractor)
  images = progress(iter_images(source, n, None), n, "sample features", not args.no_progress)
  features = extractor(images, outputs=("pool", "logits_unbiased"))
  return set_metrics(features, reference, is_splits=args.is_splits, pr_k=args.pr_k)


def run_autoencoder(args) -> dict:
  from ldm_jax.eval import reconstruction
  if args.batch_size < 1:
    raise UserError(f"--batch_size={args.batch_size}: expected >= 1.")
  source = open_source(args.data, args.data_dir, "--data")
  extractor = None
  if args.inception:  # rFID is optional here: PSNR / SSIM / LPIPS need no Inception.
    extractor = load_extractor(args.inception, args.inception_batch, args.num_devices)
  lpips_params = None
  if args.lpips:
    from ldm_jax.convert import common
    from ldm_jax.convert import lpips as lpips_convert
    try:
      lpips_params = lpips_convert.load_lpips_params(args.lpips)
    except (FileNotFoundError, common.WeightLoadError) as e:
      raise UserError(f"--lpips={args.lpips}: {' '.join(str(e).split())}") from None
  module, variables, cfg = reconstruction.load_first_stage(args.checkpoint, args.compvis_ckpt,
                                                           args.compvis_yaml)
  f = 2 ** (len(cfg["kwargs"]["ch_mult"]) - 1)
  if args.image_size % f:
    raise UserError(f"--image_size={args.image_size}: expected a multiple of the first stage's "
                    f"down-sampling factor {f}.")
  n = _count(source, args.num_images)
  if extractor is not None and n < 2:
    raise UserError(f"rFID needs at least 2 images (--num_images={args.num_images}, {n} found).")
  metrics = reconstruction.evaluate_autoencoder(
      module, variables, iter_images(source, n, args.image_size), n, batch_size=args.batch_size,
      extractor=extractor, lpips_params=lpips_params,
      progress=functools.partial(progress, enabled=not args.no_progress))
  metrics["first_stage"] = cfg
  return metrics


def run_stats(args) -> dict:
  from ldm_jax.eval import fid
  if reference_kind(args.reference) == "stats":
    raise UserError(f"--reference={args.reference}: already a statistics file; expected an image "
                    "folder or tfds:NAME[:SPLIT].")
  if not args.out.endswith(".npz"):
    raise UserError(f"--out={args.out}: expected a path ending in .npz.")
  extractor = load_extractor(args.inception, args.inception_batch, args.num_devices)
  ref = load_reference(args.reference, extractor, need_features=True,
                       max_images=args.max_reference, image_size=args.reference_size,
                       data_dir=args.data_dir, show_progress=not args.no_progress)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fid.save_stats(args.out, ref.mu, ref.sigma)
  return {"num_images": ref.count}


def run(args) -> dict:
  """Runs one mode; returns (and, except for `stats`, writes) the result record."""
  _check_positive(args, "num_samples", "max_reference", "reference_size", "max_images",
                  "image_size", "num_images", "pr_k")
  if getattr(args, "is_splits", 1) < 1 or args.inception_batch < 1:
    bad = "is_splits" if getattr(args, "is_splits", 1) < 1 else "inception_batch"
    raise UserError(f"--{bad}={getattr(args, bad)}: expected >= 1.")
  start = time.time()
  metrics = {"samples": run_samples, "folder": run_folder, "autoencoder": run_autoencoder,
             "stats": run_stats}[args.mode](args)
  result = {"mode": args.mode, "metrics": metrics, "settings": vars(args),
            "seconds": round(time.time() - start, 1)}
  if args.mode != "stats":
    write_result(args.out, result)
  return result


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    result = run(args)
  except UserError as e:
    print(f"evaluate.py: error: {e}", file=sys.stderr)
    return 2
  shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result["metrics"].items()
           if not isinstance(v, dict)}
  print(f"{args.mode}: {shown} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
