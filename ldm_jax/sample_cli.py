"""The logic behind sample.py: check the arguments, load the model, sample in batches, write files.

Every user mistake becomes a `UserError` with one line naming the argument, the value and what was
expected; sample.py prints it and exits with code 2.
"""

import json
import os
from typing import Any

import numpy as np

SAMPLER_NAMES = {"ddim": "ddim", "plms": "plms", "ddpm": "ddpm", "dpmpp_2m": "dpmpp_2m",
                 "euler_a": "euler_ancestral"}


class UserError(Exception):
  pass


def read_image(path: str, what: str, mode: str = "RGB") -> np.ndarray:
  """An image file as uint8 [H, W, C]; a clear error for missing or unreadable files."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert(mode))
  except FileNotFoundError:
    raise UserError(f"{what}={path}: no such file.") from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise UserError(f"{what}={path}: not a readable image ({e}).") from None


def load_model(args):
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import model_io
  from ldm_jax.convert import common
  sources = [s for s in (args.checkpoint, args.compvis_ckpt, args.diffusers) if s]
  if len(sources) != 1:
    raise UserError("give exactly one of --checkpoint, --compvis_ckpt (+ --compvis_yaml) or "
                    f"--diffusers (got {len(sources)}).")
  try:
    if args.checkpoint:
      return ldm_lib.LatentDiffusion.from_checkpoint(args.checkpoint, use_ema=not args.no_ema,
                                                     compute_dtype=args.dtype,
                                                     tokenizer_path=args.tokenizer)
    if args.compvis_ckpt:
      if not args.compvis_yaml:
        raise UserError("--compvis_ckpt needs --compvis_yaml (the model's original config).")
      return ldm_lib.LatentDiffusion.from_compvis(args.compvis_ckpt, args.compvis_yaml,
                                                  use_ema=False if args.no_ema else None,
                                                  tokenizer_path=args.tokenizer,
                                                  compute_dtype=args.dtype)
    return ldm_lib.LatentDiffusion.from_diffusers(args.diffusers, compute_dtype=args.dtype)
  except UserError:
    raise
  except (model_io.CheckpointNotFoundError, FileNotFoundError) as e:
    raise UserError(f"cannot load the model: {e}") from None
  except common.WeightLoadError as e:
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    raise UserError("the weights do not match the model's config: " + "; ".join(lines[:4])
                    ) from None
  except (ValueError, OSError, KeyError) as e:
    raise UserError(f"cannot load the model: {type(e).__name__}: {e}") from None


def add_model_arguments(group) -> None:
  """The model-source flags that `load_model` reads (sample.py, evaluate.py): give exactly one."""
  group.add_argument("--checkpoint", help="training workdir or saved/converted model directory")
  group.add_argument("--compvis_ckpt", help="original CompVis / Stable Diffusion .ckpt/.safetensors")
  group.add_argument("--compvis_yaml", help="the YAML config that goes with --compvis_ckpt")
  group.add_argument("--diffusers",
                     help="a diffusers pipeline folder (unet/, vae/, text_encoder/ ...)")
  group.add_argument("--tokenizer", help="local tokenizer directory (text models from .ckpt files)")
  group.add_argument("--no_ema", action="store_true", help="use raw instead of EMA weights")


def read_prompts(args) -> list[str]:
  """--prompt values, then the non-empty lines of --prompt_file."""
  prompts = list(args.prompt or [])
  if args.prompt_file:
    try:
      with open(args.prompt_file) as f:
        prompts += [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise UserError(f"--prompt_file={args.prompt_file}: cannot read it ({e}).") from None
  return prompts


def requests(args, model) -> list[dict[str, Any]]:
  """One entry per sample: its prompt or label (or nothing) and its seed."""
  prompts = read_prompts(args)
  labels = list(args.class_label or [])
  if prompts and not model.is_text:
    raise UserError(f"--prompt was given, but this model is conditioned by "
                    f"'{model.cond_kind}', not text.")
  if labels and model.cond_kind != "class":
    raise UserError(f"--class_label was given, but this model is conditioned by "
                    f"'{model.cond_kind}', not class labels.")
  if model.is_text and not prompts:
    raise UserError("this is a text-conditional model: give --prompt or --prompt_file.")
  if model.cond_kind == "class" and not labels:
    raise UserError("this is a class-conditional model: give --class_label.")
  if labels:
    n = int(model.cond_stage_config.get("kwargs", {}).get("n_classes", 0))
    bad = [lab for lab in labels if not 0 <= lab < n]
    if bad:
      raise UserError(f"--class_label={bad[0]}: expected 0 <= label < {n}.")
  if args.num_samples < 1:
    raise UserError(f"--num_samples={args.num_samples}: expected >= 1.")
  base = [{"prompt": p} for p in prompts] or [{"label": lab} for lab in labels] or [{}]
  out = []
  for item in base:
    for _ in range(args.num_samples):
      out.append(dict(item, seed=args.seed + len(out)))
  return out


def resolve_sampling(args, model) -> None:
  """Fills --sampler / --steps / --guidance left out with the model's recommended settings (else
  the library defaults) and prints what will be used; an explicit flag always wins."""
  from ldm_jax import ldm as ldm_lib
  cli_name = {v: k for k, v in SAMPLER_NAMES.items()}
  chosen = model.sampling_settings(
      sampler=SAMPLER_NAMES[args.sampler] if args.sampler else None, steps=args.steps,
      guidance=args.guidance)
  args.sampler, args.steps, args.guidance = (cli_name[chosen["sampler"]], chosen["steps"],
                                             chosen["guidance"])
  print(f"Sampling with {ldm_lib.describe_sampling(dict(chosen, sampler=args.sampler))}")


def check_sizes(args, model) -> tuple[int, int]:
  stride = model.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)
  default = int(model.config.diffusion.image_size) * model.downsample_factor
  h = args.height or default
  w = args.width or default
  for name, v in (("--height", h), ("--width", w)):
    if v <= 0 or v % stride:
      raise UserError(f"{name}={v}: expected a positive multiple of {stride} (the first stage's "
                      f"factor {model.downsample_factor} x the UNet's {stride // model.downsample_factor}).")
  t = int(model.config.diffusion.timesteps)
  if not 1 <= args.steps <= t:
    raise UserError(f"--steps={args.steps}: expected 1 <= steps <= {t}.")
  if args.strength is not None and not 0.0 < args.strength <= 1.0:
    raise UserError(f"--strength={args.strength}: expected 0 < strength <= 1.")
  if args.strength is not None and not args.init_image:
    raise UserError("--strength needs --init_image.")
  if args.mask and not args.init_image:
    raise UserError("--mask needs --init_image.")
  if args.guidance < 0:
    raise UserError(f"--guidance={args.guidance}: expected >= 0.")
  if args.batch_size < 1:
    raise UserError(f"--batch_size={args.batch_size}: expected >= 1.")
  return h, w


def image_inputs(args, h: int, w: int) -> dict[str, np.ndarray]:
  """init image / mask / low-res condition as float arrays in the model's conventions."""
  out = {}
  if args.init_image:
    img = read_image(args.init_image, "--init_image")
    if img.shape[:2] != (h, w):
      raise UserError(f"--init_image={args.init_image}: size {img.shape[1]}x{img.shape[0]} "
                      f"differs from the requested {w}x{h} (give --width/--height to match).")
    out["init_image"] = img.astype(np.float32) / 127.5 - 1.0
  if args.mask:
    mask = read_image(args.mask, "--mask", mode="L")
    if mask.shape[:2] != out["init_image"].shape[:2]:
      raise UserError(f"--mask={args.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from "
                      f"--init_image's {out['init_image'].shape[1]}x{out['init_image'].shape[0]}.")
    out["mask"] = (mask.astype(np.float32) / 255.0 > 0.5).astype(np.float32)[..., None]
  if args.lowres:
    out["lowres"] = read_image(args.lowres, "--lowres").astype(np.float32) / 127.5 - 1.0
  return out


def run(args) -> list[str]:
  """Samples everything the arguments ask for; returns the written PNG paths."""
  from PIL import Image
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import sampling
  model = load_model(args)
  resolve_sampling(args, model)
  h, w = check_sizes(args, model)
  reqs = requests(args, model)
  imgs = image_inputs(args, h, w)
  os.makedirs(args.outdir, exist_ok=True)
  paths, records, all_images = [], [], []
  for start in range(0, len(reqs), args.batch_size):
    chunk = reqs[start:start + args.batch_size]
    kwargs = dict(height=h, width=w, sampler=SAMPLER_NAMES[args.sampler], steps=args.steps,
                  eta=args.eta, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
                  seeds=[r["seed"] for r in chunk], progress=not args.no_progress)
    if "prompt" in chunk[0]:
      kwargs["prompts"] = [r["prompt"] for r in chunk]
    if "label" in chunk[0]:
      kwargs["labels"] = [r["label"] for r in chunk]
    n = len(chunk)
    if "init_image" in imgs:
      kwargs["init_image"] = np.repeat(imgs["init_image"][None], n, 0)
      kwargs["strength"] = args.strength
    if "mask" in imgs:
      kwargs["mask"] = np.repeat(imgs["mask"][None], n, 0)
    if "lowres" in imgs:
      kwargs["images"] = np.repeat(imgs["lowres"][None], n, 0)
    try:
      images = ldm_lib.to_uint8(sampling.sample(model, **kwargs))
    except sampling.SamplingInputError as e:
      raise UserError(str(e)) from None
    for r, img in zip(chunk, images):
      path = os.path.join(args.outdir, f"{len(paths):06d}.png")
      Image.fromarray(img).save(path)
      paths.append(path)
      records.append(dict(r, file=os.path.basename(path)))
      all_images.append(img)
  Image.fromarray(make_grid(np.stack(all_images))).save(os.path.join(args.outdir, "grid.png"))
  settings = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "guidance",
                                            "guidance_rescale", "strength", "init_image", "mask",
                                            "lowres", "checkpoint", "compvis_ckpt", "diffusers",
                                            "dtype")}
  settings.update(height=h, width=w, use_ema=not args.no_ema)
  with open(os.path.join(args.outdir, "samples.json"), "w") as f:
    json.dump({"settings": settings, "samples": records}, f, indent=2)
  print(f"Wrote {len(paths)} samples, grid.png and samples.json to {args.outdir}")
  return paths


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 image with the samples in rows of `cols`."""
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid
