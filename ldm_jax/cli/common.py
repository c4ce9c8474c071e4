"""What the command lines share: the parser, the one-line error exit, the model-source flags.

`load_model` turns `--checkpoint` / `--compvis_ckpt` / `--diffusers` into a `LatentDiffusion` and
every library error on the way into a `UserError` that names the flag; `report` prints one.
"""

import argparse
import math
import sys

import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax.convert import common
from ldm_jax.data import folder
from ldm_jax.errors import ConfigError, UserError, WeightLoadError
from ldm_jax.train import lora as lora_training


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a mistake is one line on stderr (exit code 2) instead of usage + error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help).\n")


def one_line(e: BaseException) -> str:
  """An error's message on one line: library messages may list tensors over several lines."""
  return " ".join(str(e).split())


def report(prog: str, e: UserError) -> int:
  """Prints `prog: error: <message>` as one line on stderr; returns the exit code, 2."""
  print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
  return 2


def finite_float(text: str) -> float:
  """argparse type: a number that is neither NaN nor infinite (those would sample black images)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
  return value


def first_lines(e: BaseException, n: int) -> str:
  """The first n non-empty lines of a multi-line library message, joined with '; '."""
  lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
  return "; ".join(lines[:n])


def read_image(path: str, what: str, mode: str = "RGB") -> np.ndarray:
  """An image file as uint8 [H, W, C]: decoder chosen by extension, size capped, EXIF orientation
  applied (`data.folder.open_image`); a UserError naming the flag and the file otherwise."""
  try:
    im = folder.open_image(path)
  except FileNotFoundError:
    raise UserError(f"{what}={path}: no such file.") from None
  except folder.ImageReadError as e:
    raise UserError(f"{what}={path}: not a readable image ({e}).") from None
  if mode == "RGB":
    return folder.to_rgb(im)
  return np.asarray(im.convert(mode))


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
                     help="merge a LoRA .safetensors file (diffusers/PEFT or Kohya layout) or "
                          "the adapters of a LoRA training workdir into the UNet / text "
                          "encoder, scaled (default 1); repeatable")


def load_model(args) -> ldm_lib.LatentDiffusion:
  """The model the model-source flags name, LoRAs merged, weights checked to be finite."""
  sources = [s for s in (args.checkpoint, args.compvis_ckpt, args.diffusers) if s]
  if len(sources) != 1:
    raise UserError("give exactly one of --checkpoint, --compvis_ckpt (+ --compvis_yaml) or "
                    f"--diffusers (got {len(sources)}).")
  if args.compvis_ckpt and not args.compvis_yaml:
    raise UserError("--compvis_ckpt needs --compvis_yaml (the model's original config).")
  flag = (f"--checkpoint={args.checkpoint}" if args.checkpoint else
          f"--compvis_ckpt={args.compvis_ckpt}" if args.compvis_ckpt else
          f"--diffusers={args.diffusers}")
  try:
    if args.checkpoint:
      model = ldm_lib.LatentDiffusion.from_checkpoint(args.checkpoint, use_ema=not args.no_ema,
                                                      compute_dtype=args.dtype,
                                                      tokenizer_path=args.tokenizer)
    elif args.compvis_ckpt:
      model = ldm_lib.LatentDiffusion.from_compvis(args.compvis_ckpt, args.compvis_yaml,
                                                   use_ema=False if args.no_ema else None,
                                                   tokenizer_path=args.tokenizer,
                                                   compute_dtype=args.dtype)
    else:
      model = ldm_lib.LatentDiffusion.from_diffusers(args.diffusers, compute_dtype=args.dtype)
  # Library messages may span lines (lists of mismatched tensors): the promise is one line.
  except (FileNotFoundError, ConfigError) as e:  # CheckpointNotFoundError included.
    raise UserError(f"cannot load the model {flag}: {one_line(e)}") from None
  except WeightLoadError as e:
    raise UserError(f"{flag}: the weights do not match the model's config: "
                    + first_lines(e, 4)) from None
  except (ValueError, OSError, KeyError) as e:
    raise UserError(f"cannot load the model {flag}: {type(e).__name__}: {one_line(e)}") from None
  if getattr(args, "lora", None):
    model.params = merge_loras(model, args.lora)
  check_finite_params(model.params, flag)
  return model


def merge_loras(model, specs) -> dict:
  """model.params with the --lora FILE[:SCALE] files merged in; a UserError naming the file when
  one is unreadable or does not fit the model. The parameters stay arguments of the compiled
  sampler, so another file or scale compiles nothing new."""
  try:
    return lora_training.merge_files(model.config, model.params, specs)
  except (ValueError, OSError) as e:  # LoraError, CheckpointError, missing files
    raise UserError("--lora: " + first_lines(e, 6)) from None


def check_finite_params(params, what: str) -> None:
  """A UserError naming the first parameter holding NaN or inf: such weights sample black images.

  One vectorised reduction per leaf (on the leaf's device for JAX arrays): seconds for SD-sized
  models, nothing next to loading them.
  """
  for key, leaf in common.flatten(params).items():
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    finite = np.isfinite(leaf).all() if isinstance(leaf, np.ndarray) else jnp.isfinite(leaf).all()
    if not bool(finite):
      bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
      raise UserError(f"{what}: parameter {'/'.join(map(str, key))} holds {bad} NaN or infinite "
                      f"value(s) of {np.size(leaf)}; the weights are damaged.")


def check_utf8(text: str, what: str) -> None:
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
    check_utf8(p, "--prompt")
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
