"""sample.py: check the arguments, load the model, sample in batches, write the files.

Every user mistake becomes a `UserError` with one line naming the argument, the value and what was
expected; `main` prints it and exits with code 2.
"""

import json
import os
import sys
from typing import Any

import numpy as np
from PIL import Image

from ldm_jax import compile_cache
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.cli import common as cli
from ldm_jax.cli import spatial_inputs
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import UserError

DESCRIPTION = "Samples images from a latent diffusion model on the command line."
# The flags `check_sampling` hands to the shared check, under their setting names.
SAMPLING_FLAGS = ("sampler", "steps", "eta", "guidance", "guidance_rescale", "strength")


def parse_args(argv):
  p = cli.ArgumentParser(prog="sample.py", description=DESCRIPTION)
  cli.add_model_arguments(p.add_argument_group("model (exactly one)"))
  what = p.add_argument_group("what to sample")
  what.add_argument("--prompt", action="append", help="text prompt (repeatable)")
  what.add_argument("--prompt_file", help="a file with one prompt per line")
  what.add_argument("--class_label", type=int, action="append", help="class label (repeatable)")
  what.add_argument("--init_image", help="img2img / inpainting input image")
  what.add_argument("--strength", type=cli.finite_float, help="img2img strength in (0, 1]")
  what.add_argument("--mask", help="inpainting mask image (white = keep, black = repaint)")
  what.add_argument("--lowres", help="low-resolution image for super-resolution models")
  what.add_argument("--layout", help="layout-to-image models: a JSON list of [x0, y0, x1, y1, "
                                     "class] boxes in pixels of the output image")
  what.add_argument("--semantic_map", help="semantic-synthesis models: a PNG of class indices "
                                           "(palette or grayscale) of the output's size")
  what.add_argument("--height", type=int, help="output height in pixels (multiple of the stride)")
  what.add_argument("--width", type=int, help="output width in pixels (multiple of the stride)")
  family = p.add_argument_group("Stable Diffusion family")
  family.add_argument("--negative_prompt", action="append",
                      help="what guidance steers away from (text models, guidance != 1): one for "
                           "all prompts, or repeated once per prompt")
  family.add_argument("--noise_level", type=int,
                      help="x4 upscaler: noise added to --lowres, 0..max_noise_level (default 20)")
  family.add_argument("--depth_map", help="depth-to-image models: a depth image (grayscale, any "
                                          "size and bit depth); no depth estimator is bundled")
  how = p.add_argument_group("sampler")
  # --sampler / --steps / --guidance default to the model's recommended settings (its config).
  how.add_argument("--sampler", choices=samplers.NAMES,
                   help="default: the model's recommendation, else ddim")
  how.add_argument("--steps", type=int, help="default: the model's recommendation, else 50")
  how.add_argument("--eta", type=cli.finite_float, default=0.0,
                   help="DDIM noise (0 = deterministic; ddim only)")
  how.add_argument("--guidance", type=cli.finite_float,
                   help="classifier-free guidance scale; default: the model's recommendation, "
                        "else 1.0 (none)")
  how.add_argument("--guidance_rescale", type=cli.finite_float, default=0.0,
                   help="in [0, 1]")
  how.add_argument("--classifier", metavar="CKPT",
                   help="classifier guidance towards --class_label: a workdir of the classifier "
                        "task, or a CompVis / guided-diffusion classifier checkpoint file "
                        "(ddim, plms, ddpm)")
  how.add_argument("--classifier_scale", type=cli.finite_float,
                   help="classifier guidance scale (default 1.0; 0 = unguided)")
  how.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; below 2**32")
  how.add_argument("--num_samples", type=int, default=1, help="samples per prompt / label")
  how.add_argument("--batch_size", type=int, default=8)
  how.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  how.add_argument("--num_devices", type=int, metavar="N",
                   help="split each batch over the first N devices of this host (0 = all, "
                        f"1 = no sharding; default: ${sampling.NUM_DEVICES_ENV}, else 0)")
  p.add_argument("--outdir", required=True)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--compilation_cache", metavar="DIR|off",
                 help="JAX's persistent compilation cache (default: $LDM_JAX_COMPILATION_CACHE, "
                      "else ~/.cache/ldm_jax/jax); 'off' disables it")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    try:
      compile_cache.enable(args.compilation_cache)
    except OSError as e:
      raise UserError(f"--compilation_cache: {e}") from None
    run(args)
  except UserError as e:
    sys.exit(cli.report("sample.py", e))


def check_sampling(args, timesteps: int | None = None) -> None:
  """Ranges and combinations of the sampler flags (`sampling_settings.check`); a flag left out
  (None, to be filled from the model's recommended settings) is checked once `resolve_sampling`
  has filled it. timesteps: the loaded model's T (None before it is loaded)."""
  if args.strength is not None and not args.init_image:
    raise UserError("--strength needs --init_image.")
  sampling_settings.check({k: getattr(args, k) for k in SAMPLING_FLAGS}, prefix="--",
                          timesteps=timesteps)


def check_arguments(args) -> list[str]:
  """Checks every flag that needs no model, before anything is loaded; returns the prompts.

  NaN and inf are refused by the parser (`finite_float`); this checks ranges and combinations.
  """
  check_sampling(args)
  check_classifier_flags(args)
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
  prompts = cli.read_prompts(args)
  check_negative_prompts(args, prompts)
  count = max(len(prompts) or len(args.class_label or ()), 1) * args.num_samples
  sampling_settings.check({"seed": args.seed}, prefix="--", num_samples=count)
  return prompts


def check_classifier_flags(args) -> None:
  """--classifier / --classifier_scale / --class_label, before the model is loaded."""
  if args.classifier is None:
    if args.classifier_scale is not None:
      raise UserError("--classifier_scale needs --classifier (the noisy-latent classifier).")
    return
  if args.classifier_scale is None:
    args.classifier_scale = 1.0
  if args.classifier_scale < 0:
    raise UserError(f"--classifier_scale={args.classifier_scale}: expected >= 0.")
  if not args.class_label:
    raise UserError("--classifier needs --class_label: the class each sample is guided towards.")


def check_negative_prompts(args, prompts: list[str]) -> None:
  """--negative_prompt: UTF-8, and one for all prompts or one per prompt."""
  negative = args.negative_prompt or []
  for p in negative:
    cli.check_utf8(p, "--negative_prompt")
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
  if labels and model.cond_kind != "class" and not args.classifier:
    raise UserError(f"--class_label was given, but this model is conditioned by "
                    f"'{model.cond_kind}', not class labels.")
  if model.is_text and not prompts and not args.layout:
    raise UserError("this is a text-conditional model: give --prompt or --prompt_file.")
  if model.cond_kind == "class" and not labels:
    raise UserError("this is a class-conditional model: give --class_label.")
  if labels and model.cond_kind == "class":  # A classifier's classes are checked by sampling.
    n = int(model.cond_stage_config.get("kwargs", {}).get("n_classes", 0))
    bad = [lab for lab in labels if not 0 <= lab < n]
    if bad:
      raise UserError(f"--class_label={bad[0]}: expected 0 <= label < {n}.")
  takes_image = takes_condition_image(model)
  if args.lowres and not takes_image:
    raise UserError(f"--lowres was given, but this model takes no conditioning image (it is "
                    f"conditioned by '{model.cond_kind}'); --lowres is for super-resolution "
                    f"models.")
  if takes_image and not args.lowres and not args.semantic_map:
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
  return h, w


def read_images(args) -> dict[str, np.ndarray]:
  """Decodes --init_image, --mask and --lowres (uint8), before any model is loaded."""
  out = {}
  if args.init_image:
    out["init_image"] = cli.read_image(args.init_image, "--init_image")
  if args.mask:
    out["mask"] = cli.read_image(args.mask, "--mask", mode="L")
  if args.lowres:
    out["lowres"] = cli.read_image(args.lowres, "--lowres")
  if args.depth_map:
    out["depth_map"] = cli.read_image(args.depth_map, "--depth_map", mode="F")  # 8 or 16 bit
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
  prompts = check_arguments(args)
  mesh = sampling.local_mesh(args.num_devices)  # None on one device.
  raw_images = read_images(args)
  model = cli.load_model(args)
  resolve_sampling(args, model)
  # Again, with the settings the model recommended and its number of timesteps.
  check_sampling(args, int(model.config.diffusion.timesteps))
  upscaler_default_size(args, model, raw_images)
  h, w = check_sizes(args, model)
  spatial = spatial_inputs.read_inputs(args, model, h, w)  # --layout / --semantic_map
  reqs = requests(args, model, prompts)
  check_model_inputs(args, model)
  imgs = image_inputs(args, raw_images, h, w)
  classifier = None
  if args.classifier:
    classifier = sampling.load_classifier(args.classifier, model)
    f = model.downsample_factor
    sampling.check_classifier(model, classifier, args.class_label, args.sampler, (h // f, w // f))
  os.makedirs(args.outdir, exist_ok=True)
  paths, records, all_images = [], [], []
  for start in range(0, len(reqs), args.batch_size):
    chunk = reqs[start:start + args.batch_size]
    kwargs = dict(height=h, width=w, sampler=args.sampler, steps=args.steps,
                  eta=args.eta, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
                  seeds=[r["seed"] for r in chunk], progress=not args.no_progress, mesh=mesh)
    if "prompt" in chunk[0]:
      kwargs["prompts"] = [r["prompt"] for r in chunk]
    if "label" in chunk[0]:
      kwargs["labels"] = [r["label"] for r in chunk]
    if classifier is not None:
      kwargs.update(classifier=classifier, classifier_scale=args.classifier_scale)
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
    kwargs.update({k: np.repeat(v[None], n, 0) for k, v in spatial.items()})
    # Inputs the sampler cannot take raise SamplingInputError, a UserError: main reports it.
    images = ldm_lib.to_uint8(sampling.sample(model, **kwargs))
    for r, img in zip(chunk, images):
      path = os.path.join(args.outdir, f"{len(paths):06d}.png")
      Image.fromarray(img).save(path)
      paths.append(path)
      records.append(dict(r, file=os.path.basename(path)))
      all_images.append(img)
  grid = sampling.make_grid(np.stack(all_images))  # [H, W, 3]
  Image.fromarray(grid).save(os.path.join(args.outdir, "grid.png"))
  settings = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "guidance",
                                            "guidance_rescale", "strength", "init_image", "mask",
                                            "lowres", "checkpoint", "compvis_ckpt", "diffusers",
                                            "dtype", "lora", "classifier",
                                            "classifier_scale")}
  settings.update(noise_level=args.noise_level, depth_map=args.depth_map, layout=args.layout,
                  semantic_map=args.semantic_map)
  settings.update(height=h, width=w, use_ema=not args.no_ema)
  with open(os.path.join(args.outdir, "samples.json"), "w") as f:
    json.dump({"settings": settings, "samples": records}, f, indent=2)
  print(f"Wrote {len(paths)} samples, grid.png and samples.json to {args.outdir}")
  return paths
