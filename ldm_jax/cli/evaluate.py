"""evaluate.py: the paper's metrics for models and image sets, on the command line.

  # Sample N images from a checkpoint, then FID / IS / precision-recall against a reference:
  python evaluate.py samples --checkpoint workdirs/shapes_ldm --num_samples 5000 --steps 50 \
      --inception fid_inception.npz --reference data/shapes_val --out results/ldm.json
  # An existing folder of samples against a reference (a folder, tfds:NAME[:SPLIT] or stats .npz):
  python evaluate.py folder --samples outputs/run1 --reference tfds:celeb_a_hq/256 \
      --inception fid_inception.npz --out results/run1.json
  # A super-resolution, inpainting or semantic-synthesis model against ground truth: each image's
  # low-res view / holes / map conditions a sample; FID / IS and PSNR / SSIM / LPIPS per image:
  python evaluate.py paired --checkpoint workdirs/sr_x4 --data data/val --num_images 1000 \
      --steps 100 --lpips lpips_vgg.npz --inception fid_inception.npz --out results/sr.json
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
The metrics live in ldm_jax/eval/ (`image_sets`, `sample_eval`, `paired_eval`, `reconstruction`);
the training hook (ldm_jax/train/eval_hook.py) uses the same library every `config.eval.every_steps`.
"""

import argparse
import functools
import os
import sys
import time

from ldm_jax import model_io
from ldm_jax import sampling
from ldm_jax.cli import common as cli
from ldm_jax.convert import lpips as lpips_convert
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import InputError, UserError
from ldm_jax.eval import fid
from ldm_jax.eval import image_sets
from ldm_jax.eval import paired_eval
from ldm_jax.eval import reconstruction
from ldm_jax.eval import sample_eval
from ldm_jax.models import build

MODES = ("samples", "paired", "folder", "autoencoder", "stats")
DESCRIPTION = ("Evaluates samples and models with the paper's metrics (FID, IS, precision/recall, "
               "PSNR, SSIM, LPIPS, rFID).")


def _add_common(p: argparse.ArgumentParser, out_help: str) -> None:
  p.add_argument("--out", required=True, help=out_help)
  p.add_argument("--inception", default="", help="FID Inception weights: the converted .npz "
                 "(python -m ldm_jax.convert.inception) or pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--inception_batch", type=int, default=50, help="images per Inception batch")
  p.add_argument("--num_devices", type=int, default=0,
                 help="shard the sampler's and the Inception's batches over the first N devices "
                      "of this host (0 = all, 1 = no sharding)")
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
  p = cli.ArgumentParser(prog="evaluate.py", description=DESCRIPTION)
  sub = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
  s = sub.add_parser("samples", help="sample a checkpoint, then FID / IS / precision-recall")
  cli.add_model_arguments(s)
  s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  s.add_argument("--num_samples", type=int, default=50)
  s.add_argument("--sampler", default=sampling_settings.DEFAULTS["sampler"],
                 choices=samplers.NAMES)
  s.add_argument("--steps", type=int, default=sampling_settings.DEFAULTS["steps"])
  s.add_argument("--eta", type=cli.finite_float, default=0.0)
  s.add_argument("--guidance", type=cli.finite_float,
                 default=sampling_settings.DEFAULTS["guidance"],
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
  q = sub.add_parser("paired", help="condition a super-resolution, inpainting or semantic model "
                     "on ground-truth images; FID / IS and PSNR / SSIM / LPIPS against them")
  cli.add_model_arguments(q)
  q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  q.add_argument("--data", required=True, help="ground-truth images: an image folder or "
                                               "tfds:NAME[:SPLIT]")
  q.add_argument("--num_images", type=int, default=0, help="the first N images (0 = all)")
  q.add_argument("--image_size", type=int, default=0,
                 help="resize (shorter side) and centre-crop to this size (0 = the model's)")
  q.add_argument("--sampler", default=sampling_settings.DEFAULTS["sampler"],
                 choices=samplers.NAMES)
  q.add_argument("--steps", type=int, default=sampling_settings.DEFAULTS["steps"])
  q.add_argument("--eta", type=cli.finite_float, default=0.0)
  q.add_argument("--seed", type=int, default=0, help="output i samples from seed + i")
  q.add_argument("--batch_size", type=int, default=16, help="images per sampler batch")
  q.add_argument("--degradation", default="bicubic", choices=paired_eval.DEGRADATIONS,
                 help="super-resolution: how the low-resolution input is made")
  q.add_argument("--masks", default="box", choices=paired_eval.MASKS,
                 help="inpainting: the holes (image i's drawn from a generator seeded with i)")
  q.add_argument("--lpips", default="", help="LPIPS .npz (python -m ldm_jax.convert.lpips)")
  q.add_argument("--is_splits", type=int, default=10, help="Inception Score splits")
  q.add_argument("--save_samples", default="", help="also write the outputs as PNGs here")
  _add_common(q, "result JSON file")
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


def _extractor(args):
  return image_sets.load_extractor(args.inception, args.inception_batch, args.num_devices,
                                   field="--inception", devices_field="--num_devices")


def run_samples(args) -> dict:
  settings = sample_eval.SampleSettings(
      num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
      eta=args.eta, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
      prompts=tuple(cli.read_prompts(args)), labels=tuple(args.class_label or ()))
  if args.reference and image_sets.reference_kind(args.reference) != "stats":  # Before any work.
    image_sets.check_pr_count(args.pr_k, args.num_samples, "samples")
  extractor = _extractor(args)
  model = cli.load_model(args)
  sample_eval.check_settings(settings, model, prefix="--")
  reference = _reference(args, extractor)
  return sample_eval.evaluate_model(model, settings, extractor, reference, is_splits=args.is_splits,
                        pr_k=args.pr_k, save_dir=args.save_samples or None,
                        show_progress=not args.no_progress,
                        mesh=sampling.local_mesh(args.num_devices))


def _reference(args, extractor) -> image_sets.Reference | None:
  if not args.reference:
    return None
  return image_sets.load_reference(args.reference, extractor, need_features=args.pr_k > 0,
                        max_images=args.max_reference, image_size=args.reference_size,
                        data_dir=args.data_dir, cache_dir=args.cache_dir,
                        show_progress=not args.no_progress, pr_k=args.pr_k)


def run_folder(args) -> dict:
  source = image_sets.open_source(args.samples, None, "--samples")
  n = image_sets.count(source, args.max_images)
  if args.reference and image_sets.reference_kind(args.reference) != "stats":  # Before any work.
    image_sets.check_pr_count(args.pr_k, n, "samples")
  extractor = _extractor(args)
  reference = _reference(args, extractor)
  images = image_sets.progress(image_sets.iter_images(source, n, None), n, "sample features",
                               not args.no_progress)
  features = extractor(images, outputs=("pool", "logits_unbiased"))
  return image_sets.set_metrics(features, reference, is_splits=args.is_splits, pr_k=args.pr_k)


def _load_lpips(args):
  try:
    return lpips_convert.load_lpips_params(args.lpips)
  except (FileNotFoundError, ValueError) as e:  # WeightLoadError included.
    raise UserError(f"--lpips={args.lpips}: {cli.one_line(e)}") from None


def run_paired(args) -> dict:
  source = image_sets.open_source(args.data, args.data_dir, "--data")  # Before any work.
  n = image_sets.count(source, args.num_images)
  settings = paired_eval.PairedSettings(
      sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
      batch_size=args.batch_size, degradation=args.degradation, masks=args.masks)
  need = 2 if args.inception else 1  # FID compares sets of at least two images.
  if n < need:
    raise UserError(f"--data={args.data}: {n} image(s) (--num_images={args.num_images}); expected "
                    f"at least {need}{' for FID' if args.inception else ''}.")
  # The settings that need no model, before it is loaded (then again with its timesteps).
  sampling_settings.check({"sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                           "seed": args.seed}, prefix="--", num_samples=n)
  lpips_params = _load_lpips(args) if args.lpips else None
  extractor = _extractor(args) if args.inception else None  # FID / IS are optional here.
  model = cli.load_model(args)
  task = paired_eval.check_settings(settings, model, n, prefix="--")
  if task == paired_eval.SEMANTIC and image_sets.reference_kind(args.data, "--data") == "folder":
    # The ground truth's maps/ folder holds the condition: the same images, opened with their maps.
    source = image_sets.open_source(args.data, args.data_dir, "--data",
                                    maps_classes=paired_eval.map_classes(model))
  size = args.image_size or int(model.config.diffusion.image_size) * model.downsample_factor
  stride = model.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)
  if size % stride:
    raise UserError(f"--image_size={size}: expected a multiple of {stride} (the first stage's "
                    f"factor {model.downsample_factor} x the UNet's "
                    f"{stride // model.downsample_factor}).")
  return paired_eval.evaluate_paired(
      model, source, n, settings, extractor=extractor, lpips_params=lpips_params,
      image_size=size, is_splits=args.is_splits, save_dir=args.save_samples or None,
      mesh=sampling.local_mesh(args.num_devices), show_progress=not args.no_progress)


def load_first_stage(args) -> tuple[dict, dict]:
  """(first-stage config, variables) from --checkpoint or --compvis_ckpt + --compvis_yaml."""
  if args.compvis_ckpt and not args.compvis_yaml:
    raise UserError("--compvis_ckpt needs --compvis_yaml (the autoencoder's config.yaml).")
  if not (args.compvis_ckpt or args.checkpoint):
    raise UserError("give --checkpoint (an autoencoder or LDM workdir, or a saved model) or "
                    "--compvis_ckpt with --compvis_yaml.")
  try:
    if args.compvis_ckpt:
      return model_io.load_compvis_first_stage(args.compvis_ckpt, args.compvis_yaml)
    return model_io.load_first_stage(args.checkpoint)
  except FileNotFoundError as e:  # CheckpointNotFoundError included.
    raise UserError(f"cannot load the autoencoder: {cli.one_line(e)}") from None
  except (ValueError, OSError, KeyError) as e:  # WeightLoadError, ConfigError, damaged files.
    raise UserError(f"cannot load the autoencoder: {cli.first_lines(e, 4)}") from None


def run_autoencoder(args) -> dict:
  if args.batch_size < 1:
    raise UserError(f"--batch_size={args.batch_size}: expected >= 1.")
  source = image_sets.open_source(args.data, args.data_dir, "--data")
  extractor = None
  if args.inception:  # rFID is optional here: PSNR / SSIM / LPIPS need no Inception.
    extractor = _extractor(args)
  lpips_params = _load_lpips(args) if args.lpips else None
  cfg, variables = load_first_stage(args)
  f = 2 ** (len(cfg["kwargs"]["ch_mult"]) - 1)
  if args.image_size % f:
    raise UserError(f"--image_size={args.image_size}: expected a multiple of the first stage's "
                    f"down-sampling factor {f}.")
  n = image_sets.count(source, args.num_images)
  if extractor is not None and n < 2:
    raise UserError(f"rFID needs at least 2 images (--num_images={args.num_images}, {n} found).")
  try:
    metrics = reconstruction.evaluate_autoencoder(
        build.build_first_stage(cfg), variables,
        image_sets.iter_images(source, n, args.image_size), n, batch_size=args.batch_size,
        extractor=extractor, lpips_params=lpips_params,
        progress=functools.partial(image_sets.progress, enabled=not args.no_progress))
  except InputError as e:  # Image sizes the first stage cannot take.
    raise UserError(f"--data={args.data}: {e} (--image_size resizes and centre-crops them "
                    f"all to one size).") from None
  metrics["first_stage"] = cfg
  return metrics


def run_stats(args) -> dict:
  if image_sets.reference_kind(args.reference) == "stats":
    raise UserError(f"--reference={args.reference}: already a statistics file; expected an image "
                    "folder or tfds:NAME[:SPLIT].")
  if not args.out.endswith(".npz"):
    raise UserError(f"--out={args.out}: expected a path ending in .npz.")
  extractor = _extractor(args)
  ref = image_sets.load_reference(args.reference, extractor, need_features=True,
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
  metrics = {"samples": run_samples, "paired": run_paired, "folder": run_folder,
             "autoencoder": run_autoencoder, "stats": run_stats}[args.mode](args)
  result = {"mode": args.mode, "metrics": metrics, "settings": vars(args),
            "seconds": round(time.time() - start, 1)}
  if args.mode != "stats":
    image_sets.write_result(args.out, result)
  return result


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    result = run(args)
  except UserError as e:
    return cli.report("evaluate.py", e)
  shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result["metrics"].items()
           if not isinstance(v, dict)}
  print(f"{args.mode}: {shown} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
