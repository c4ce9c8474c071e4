"""The logic behind sample.py: check the arguments, load the model, sample in batches, write files.

Every user mistake becomes a `UserError` with one line naming the argument, the value and what was
expected; sample.py prints it and exits with code 2.
"""

import argparse
import json
import math
import os
from typing import Any

import numpy as np

# jax.random.PRNGKey folds seeds modulo 2**32 (2**32 gives the same noise as 0) and cannot take
# 2**63 or more: seeds outside [0, 2**32) would silently repeat or crash.
SEED_LIMIT = 2 ** 32


class UserError(Exception):
  pass


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a mistake is one line on stderr (exit code 2) instead of usage + error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help).\n")


def finite_float(text: str) -> float:
  """argparse type: a number that is neither NaN nor infinite (those would sample black images)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
  return value


def read_image(path: str, what: str, mode: str = "RGB") -> np.ndarray:
  """An image file as uint8 [H, W, C]: decoder chosen by extension, size capped, EXIF orientation
  applied (`data.folder.open_image`); a UserError naming the flag and the file otherwise."""
  from ldm_jax.data import folder
  try:
    im = folder.open_image(path)
  except FileNotFoundError:
    raise UserError(f"{what}={path}: no such file.") from None
  except folder.ImageReadError as e:
    raise UserError(f"{what}={path}: not a readable image ({e}).") from None
  if mode == "RGB":
    return folder.to_rgb(im)
  return np.asarray(im.convert(mode))


def load_model(args):
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import model_io
  from ldm_jax.convert import common
  sources = [s for s in (args.checkpoint, args.compvis_ckpt, args.diffusers) if s]
  if len(sources) != 1:
    raise UserError("give exactly one of --checkpoint, --compvis_ckpt (+ --compvis_yaml) or "
                    f"--diffusers (got {len(sources)}).")
  flag = (f"--checkpoint={args.checkpoint}" if args.checkpoint else
          f"--compvis_ckpt={args.compvis_ckpt}" if args.compvis_ckpt else
          f"--diffusers={args.diffusers}")
  try:
    if args.checkpoint:
      model = ldm_lib.LatentDiffusion.from_checkpoint(args.checkpoint, use_ema=not args.no_ema,
                                                      compute_dtype=args.dtype,
                                                      tokenizer_path=args.tokenizer)
    elif args.compvis_ckpt:
      if not args.compvis_yaml:
        raise UserError("--compvis_ckpt needs --compvis_yaml (the model's original config).")
      model = ldm_lib.LatentDiffusion.from_compvis(args.compvis_ckpt, args.compvis_yaml,
                                                   use_ema=False if args.no_ema else None,
                                                   tokenizer_path=args.tokenizer,
                                                   compute_dtype=args.dtype)
    else:
      model = ldm_lib.LatentDiffusion.from_diffusers(args.diffusers, compute_dtype=args.dtype)
  except UserError:
    raise
  # Library messages may span lines (lists of mismatched tensors): the promise is one line.
  except (model_io.CheckpointNotFoundError, FileNotFoundError, model_io.ConfigError) as e:
    raise UserError(f"cannot load the model {flag}: {_one_line(e)}") from None
  except common.WeightLoadError as e:
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    raise UserError(f"{flag}: the weights do not match the model's config: "
                    + "; ".join(lines[:4])) from None
  except (ValueError, OSError, KeyError) as e:
    raise UserError(f"cannot load the model {flag}: {type(e).__name__}: {_one_line(e)}") from None
  if getattr(args, "lora", None):
    model.params = merge_loras(model, args.lora)
  check_finite_params(model.params, flag)
  return model


def merge_loras(model, specs) -> dict:
  """model.params with the --lora FILE[:SCALE] files merged in; a UserError naming the file when
  one is unreadable or does not fit the model. The parameters stay arguments of the compiled
  sampler, so another file or scale compiles nothing new."""
  from ldm_jax.convert import lora
  try:
    return lora.merge_files(model.config, model.params, specs)
  except (ValueError, OSError) as e:  # LoraError, CheckpointError, missing files
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    raise UserError("--lora: " + "; ".join(lines[:6])) from None


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def check_finite_params(params, what: str) -> None:
  """A UserError naming the first parameter holding NaN or inf: such weights sample black images.

  One vectorised reduction per leaf (on the leaf's device for JAX arrays): seconds for SD-sized
  models, nothing next to loading them.
  """
  import jax.numpy as jnp
  from ldm_jax.convert import common
  for key, leaf in common.flatten(params).items():
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    finite = np.isfinite(leaf).all() if isinstance(leaf, np.ndarray) else jnp.isfinite(leaf).all()
    if not bool(finite):
      bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
      raise UserError(f"{what}: parameter {'/'.join(map(str, key))} holds {bad} NaN or infinite "
                      f"value(s) of {np.size(leaf)}; the weights are damaged.")


def add_model_arguments(group) -> None:
  """The model-source flags that `load_model` reads (sample.py, evaluate.py): give exactly one."""
  group.add_argument("--checkpoint", help="training workdir or saved/converted model directory")
  group.add_argument("--compvis_ckpt", help="original CompVis / Stable Diffusion .ckpt/.safetensors")
  group.add_argument("--compvis_yaml", help="the YAML config that goes with --compvis_ckpt")
  group.add_argument("--diffusers",
                     help="a diffusers pipeline folder (unet/, vae/, text_encoder/ ...)")
  group.add_argument("--tokenizer", help="local tokenizer directory (text models from .ckpt files)")
  group.add_argument("--no_ema", action="store_true", help="use raw instead of EMA weights")
  group.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                     help="merge a LoRA .safetensors file (diffusers/PEFT or Kohya layout) into "
                          "the UNet / text encoder, scaled (default 1); repeatable")


def _check_utf8(text: str, what: str) -> None:
  """Command-line bytes that are not UTF-8 arrive as lone surrogates: refuse them by name."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raw = text.encode("utf-8", "surrogateescape")
    shown = raw.decode("utf-8", "backslashreplace")
    raise UserError(f"{what}={shown!r}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                    f"character {e.start}); expected UTF-8.") from None


def read_prompts(args) -> list[str]:
  """--prompt values, then the non-empty lines of --prompt_file (UTF-8; a BOM is dropped)."""
  prompts = list(args.prompt or [])
  for p in prompts:
    _check_utf8(p, "--prompt")
  if args.prompt_file:
    try:
      with open(args.prompt_file, "rb") as f:
        data = f.read()
    except OSError as e:
      raise UserError(f"--prompt_file={args.prompt_file}: cannot read it ({e}).") from None
    try:
      text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      line = data.count(b"\n", 0, e.start) + 1
      raise UserError(f"--prompt_file={args.prompt_file}: not UTF-8 text (byte "
                      f"0x{data[e.start]:02x} on line {line}); save it as UTF-8.") from None
    prompts += [line.strip() for line in text.splitlines() if line.strip()]
  return prompts


def check_sampling(args) -> None:
  """Ranges and combinations of the sampler flags; a flag left out (None, to be filled from the
  model's recommended settings) is checked once `resolve_sampling` has filled it."""
  from ldm_jax.diffusion import samplers_base
  if args.steps is not None and args.steps < 1:
    raise UserError(f"--steps={args.steps}: expected >= 1.")
  if args.eta < 0:
    raise UserError(f"--eta={args.eta}: expected >= 0 (0 = deterministic DDIM).")
  if args.eta != 0 and args.sampler not in (None, "ddim"):
    raise UserError(f"--eta={args.eta} with --sampler={args.sampler}: eta is a DDIM setting; "
                    f"expected --eta 0 or --sampler ddim.")
  if args.guidance is not None and args.guidance < 0:
    raise UserError(f"--guidance={args.guidance}: expected >= 0.")
  if not 0.0 <= args.guidance_rescale <= 1.0:
    raise UserError(f"--guidance_rescale={args.guidance_rescale}: expected 0 <= rescale <= 1.")
  if args.strength is not None:
    if not args.init_image:
      raise UserError("--strength needs --init_image.")
    if not 0.0 < args.strength <= 1.0:
      raise UserError(f"--strength={args.strength}: expected 0 < strength <= 1.")
    if args.steps is not None:
      try:
        samplers_base.img2img_skip(args.steps, args.strength)
      except ValueError:
        raise UserError(f"--strength={args.strength} with --steps={args.steps} runs no denoising "
                        f"step: expected --strength >= {1.0 / args.steps:.4g} (1 / steps), or "
                        f"more --steps.") from None


def check_arguments(args) -> list[str]:
  """Checks every flag that needs no model, before anything is loaded; returns the prompts.

  NaN and inf are refused by the parser (`finite_float`); this checks ranges and combinations.
  """
  check_sampling(args)
  if args.mask and not args.init_image:
    raise UserError("--mask needs --init_image.")
  for name in ("height", "width"):
    value = getattr(args, name)
    if value is not None and value <= 0:
      raise UserError(f"--{name}={value}: expected a positive number of pixels.")
  if args.num_samples < 1:
    raise UserError(f"--num_samples={args.num_samples}: expected >= 1.")
  if args.batch_size < 1:
    raise UserError(f"--batch_size={args.batch_size}: expected >= 1.")
  prompts = read_prompts(args)
  check_negative_prompts(args, prompts)
  count = max(len(prompts) or len(args.class_label or ()), 1) * args.num_samples
  if not 0 <= args.seed or args.seed + count > SEED_LIMIT:
    raise UserError(f"--seed={args.seed}: expected 0 <= seed <= {SEED_LIMIT - count} (sample i "
                    f"uses seed + i, {count} samples, seeds below 2**32).")
  return prompts


def check_negative_prompts(args, prompts: list[str]) -> None:
  """--negative_prompt: UTF-8, and one for all prompts or one per prompt."""
  negative = args.negative_prompt or []
  for p in negative:
    _check_utf8(p, "--negative_prompt")
  if len(negative) > 1 and len(negative) != len(prompts):
    raise UserError(f"--negative_prompt given {len(negative)} times for {len(prompts)} prompts: "
                    f"expected once (for all prompts) or once per prompt.")


def check_model_inputs(args, model) -> None:
  """The new family flags against the loaded model and the resolved guidance."""
  if args.negative_prompt:
    if not model.is_text:
      raise UserError(f"--negative_prompt was given, but this model is conditioned by "
                      f"'{model.cond_kind}', not text.")
    if args.guidance == 1.0:
      raise UserError("--negative_prompt acts only through classifier-free guidance: expected "
                      "--guidance != 1.")
  if model.is_inpainting and not (args.init_image and args.mask):
    raise UserError("this is an inpainting model: give --init_image and --mask (white = keep).")
  if args.depth_map and not model.is_depth:
    raise UserError(f"--depth_map was given, but this is not a depth-to-image model (it is "
                    f"conditioned by '{model.cond_kind}').")
  if model.is_depth and not args.depth_map:
    raise UserError("this is a depth-to-image model: give --depth_map (a depth image; no depth "
                    "estimator is bundled).")
  if args.noise_level is not None:
    if not model.is_upscaler:
      raise UserError(f"--noise_level was given, but this model is not the x4 upscaler (it is "
                      f"conditioned by '{model.cond_kind}').")
    if not 0 <= args.noise_level <= model.max_noise_level:
      raise UserError(f"--noise_level={args.noise_level}: expected 0 <= noise_level <= "
                      f"{model.max_noise_level} (the model's max_noise_level).")


def requests(args, model, prompts: list[str]) -> list[dict[str, Any]]:
  """One entry per sample: its prompt or label (or nothing) and its seed."""
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
  takes_image = takes_condition_image(model)
  if args.lowres and not takes_image:
    raise UserError(f"--lowres was given, but this model takes no conditioning image (it is "
                    f"conditioned by '{model.cond_kind}'); --lowres is for super-resolution "
                    f"models.")
  if takes_image and not args.lowres:
    raise UserError("this model is conditioned on an image: give --lowres.")
  base = [{"prompt": p} for p in prompts] or [{"label": lab} for lab in labels] or [{}]
  negative = list(args.negative_prompt or [])
  if negative:
    negative = negative * len(base) if len(negative) == 1 else negative
    base = [dict(item, negative_prompt=n) for item, n in zip(base, negative)]
  out = []
  for item in base:
    for _ in range(args.num_samples):
      out.append(dict(item, seed=args.seed + len(out)))
  return out


def takes_condition_image(model) -> bool:
  """Whether `LatentDiffusion.condition` uses `images` (super-resolution, semantic maps): text,
  class and inpainting models return before reading them."""
  if model.is_upscaler:
    return True
  if model.is_text or model.cond_kind in ("class", "first_stage"):
    return False
  return (model.config.diffusion.conditioning_key in ("concat", "hybrid")
          or model.cond_kind == "spatial_rescaler")


def resolve_sampling(args, model) -> None:
  """Fills --sampler / --steps / --guidance left out with the model's recommended settings (else
  the library defaults) and prints what will be used; an explicit flag always wins."""
  from ldm_jax import ldm as ldm_lib
  chosen = model.sampling_settings(sampler=args.sampler, steps=args.steps, guidance=args.guidance)
  args.sampler, args.steps, args.guidance = chosen["sampler"], chosen["steps"], chosen["guidance"]
  print(f"Sampling with {ldm_lib.describe_sampling(chosen)}")


def upscaler_default_size(args, model, raw: dict[str, np.ndarray]) -> None:
  """The x4 upscaler's output is its --lowres input times the first stage's factor, unless
  --height / --width say otherwise (then `sampling` checks that the two agree)."""
  if model.is_upscaler and "lowres" in raw:
    f = model.downsample_factor
    if args.height is None:
      args.height = raw["lowres"].shape[0] * f
    if args.width is None:
      args.width = raw["lowres"].shape[1] * f


def check_sizes(args, model) -> tuple[int, int]:
  """The output size (flags or the model's default), checked against the model's stride."""
  stride = model.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)
  default = int(model.config.diffusion.image_size) * model.downsample_factor
  h = default if args.height is None else args.height
  w = default if args.width is None else args.width
  for name, v in (("--height", h), ("--width", w)):
    if v <= 0 or v % stride:
      raise UserError(f"{name}={v}: expected a positive multiple of {stride} (the first stage's "
                      f"factor {model.downsample_factor} x the UNet's {stride // model.downsample_factor}).")
  t = int(model.config.diffusion.timesteps)
  if not 1 <= args.steps <= t:
    raise UserError(f"--steps={args.steps}: expected 1 <= steps <= {t}.")
  return h, w


def read_images(args) -> dict[str, np.ndarray]:
  """Decodes --init_image, --mask and --lowres (uint8), before any model is loaded."""
  out = {}
  if args.init_image:
    out["init_image"] = read_image(args.init_image, "--init_image")
  if args.mask:
    out["mask"] = read_image(args.mask, "--mask", mode="L")
  if args.lowres:
    out["lowres"] = read_image(args.lowres, "--lowres")
  if args.depth_map:
    out["depth_map"] = read_image(args.depth_map, "--depth_map", mode="F")  # 8 or 16 bit
  return out


def image_inputs(args, raw: dict[str, np.ndarray], h: int, w: int) -> dict[str, np.ndarray]:
  """init image / mask / low-res condition as float arrays in the model's conventions."""
  out = {}
  if "init_image" in raw:
    img = raw["init_image"]
    if img.shape[:2] != (h, w):
      raise UserError(f"--init_image={args.init_image}: size {img.shape[1]}x{img.shape[0]} "
                      f"differs from the requested {w}x{h} (give --width/--height to match).")
    out["init_image"] = img.astype(np.float32) / 127.5 - 1.0
  if "mask" in raw:
    mask = raw["mask"]
    if mask.shape[:2] != out["init_image"].shape[:2]:
      raise UserError(f"--mask={args.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from "
                      f"--init_image's {out['init_image'].shape[1]}x{out['init_image'].shape[0]}.")
    out["mask"] = (mask.astype(np.float32) / 255.0 > 0.5).astype(np.float32)[..., None]
  if "lowres" in raw:
    out["lowres"] = raw["lowres"].astype(np.float32) / 127.5 - 1.0
  return out


def run(args) -> list[str]:
  """Samples everything the arguments ask for; returns the written PNG paths."""
  from PIL import Image
  from ldm_jax import ldm as ldm_lib
  from ldm_jax import sampling
  prompts = check_arguments(args)
  raw_images = read_images(args)
  model = load_model(args)
  resolve_sampling(args, model)
  check_sampling(args)  # again, with the settings the model recommended
  upscaler_default_size(args, model, raw_images)
  h, w = check_sizes(args, model)
  reqs = requests(args, model, prompts)
  check_model_inputs(args, model)
  imgs = image_inputs(args, raw_images, h, w)
  os.makedirs(args.outdir, exist_ok=True)
  paths, records, all_images = [], [], []
  for start in range(0, len(reqs), args.batch_size):
    chunk = reqs[start:start + args.batch_size]
    kwargs = dict(height=h, width=w, sampler=args.sampler, steps=args.steps,
                  eta=args.eta, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
                  seeds=[r["seed"] for r in chunk], progress=not args.no_progress)
    if "prompt" in chunk[0]:
      kwargs["prompts"] = [r["prompt"] for r in chunk]
    if "label" in chunk[0]:
      kwargs["labels"] = [r["label"] for r in chunk]
    if "negative_prompt" in chunk[0]:
      kwargs["negative_prompt"] = [r["negative_prompt"] for r in chunk]
    n = len(chunk)
    if "init_image" in imgs:
      kwargs["init_image"] = np.repeat(imgs["init_image"][None], n, 0)
      kwargs["strength"] = args.strength
    if "mask" in imgs:
      kwargs["mask"] = np.repeat(imgs["mask"][None], n, 0)
    if "lowres" in imgs:
      kwargs["images"] = np.repeat(imgs["lowres"][None], n, 0)
    if args.noise_level is not None:
      kwargs["noise_level"] = args.noise_level
    if "depth_map" in raw_images:
      kwargs["depth_map"] = np.repeat(raw_images["depth_map"][None], n, 0)
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
                                            "dtype", "lora")}
  settings.update(noise_level=args.noise_level, depth_map=args.depth_map)
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
