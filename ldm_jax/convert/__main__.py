"""Converts original weights into an ldm_jax model directory that sample.py reads.

  python -m ldm_jax.convert --compvis_ckpt sd-v1-5.ckpt --compvis_yaml v1-inference.yaml \
      --tokenizer /path/to/clip_tokenizer --out models/sd15
  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-v1-5 --out models/sd15
  python -m ldm_jax.convert --checkpoint models/sd15 --lora style.safetensors:0.8 \
      --lora detail.safetensors --out models/sd15_style
  python -m ldm_jax.convert --export_lora workdirs/sd15_lora --layout kohya --out style.safetensors

The output holds config.json, params/ (Orbax) and, for text models, a copy of the tokenizer.
--lora FILE[:SCALE] (repeatable) merges LoRA files (diffusers/PEFT or Kohya layout) into the weights,
on an import or into an already converted model (--checkpoint); FILE may also be the workdir of a
LoRA training run (config.lora). --export_lora WORKDIR writes such a run's newest adapters (EMA ones
when it kept them, unless --no_ema) as a LoRA .safetensors file in the --layout peft (diffusers /
PEFT names and header) or kohya layout.
"""

import argparse
import os
import shutil
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--compvis_ckpt")
  p.add_argument("--compvis_yaml")
  p.add_argument("--diffusers")
  p.add_argument("--checkpoint", help="an already converted model directory (to merge --lora into)")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                 help="merge a LoRA .safetensors file (or a LoRA training workdir's adapters), "
                      "scaled (default 1); repeatable")
  p.add_argument("--export_lora", metavar="WORKDIR",
                 help="write the adapters a LoRA training run (config.lora) keeps in WORKDIR to "
                      "the .safetensors file --out")
  p.add_argument("--layout", choices=("peft", "kohya"), default="peft",
                 help="--export_lora: diffusers/PEFT (lora_A/lora_B) or Kohya (lora_down/lora_up/"
                      "alpha) keys (default peft)")
  p.add_argument("--tokenizer", help="local tokenizer directory for text models (.ckpt sources)")
  ema = p.add_mutually_exclusive_group()
  ema.add_argument("--use_ema", dest="use_ema", action="store_true", default=None,
                   help="CompVis: take the model_ema.* weights (default: when present)")
  ema.add_argument("--no_ema", dest="use_ema", action="store_false",
                   help="CompVis and --export_lora: take the raw weights even when EMA copies "
                        "exist")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  # After parsing: --help and flag mistakes answer without loading JAX and the converters.
  from ldm_jax import model_io
  from ldm_jax.convert import common
  from ldm_jax.convert import pipeline
  from ldm_jax.train import lora as lora_training
  try:
    if args.export_lora:
      return export_lora(args, lora_training)
    sources = [s for s in (args.compvis_ckpt, args.diffusers, args.checkpoint) if s]
    if len(sources) != 1:
      raise ValueError("give exactly one of --compvis_ckpt (+ --compvis_yaml), --diffusers or "
                       f"--checkpoint (got {len(sources)}).")
    if args.checkpoint and not args.lora:
      raise ValueError(f"--checkpoint={args.checkpoint} is already converted; give --lora to merge "
                       "LoRA files into it.")
    if args.checkpoint and os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
      raise ValueError(f"--out={args.out} is the --checkpoint directory; expected a new directory "
                       "(the original is kept).")
    if args.checkpoint:
      config, params = model_io.load_model(args.checkpoint)
    elif args.compvis_ckpt:
      if not args.compvis_yaml:
        raise ValueError("--compvis_ckpt needs --compvis_yaml.")
      config, params = pipeline.load_compvis(args.compvis_ckpt, args.compvis_yaml,
                                             use_ema=args.use_ema, tokenizer_path=args.tokenizer)
    else:
      config, params = pipeline.load_diffusers(args.diffusers)
    if args.lora:
      params = lora_training.merge_files(config, params, args.lora)
    tok = config.get("cond_stage", {}).get("tokenizer", {})
    if tok and tok.get("path"):
      shutil.copytree(tok["path"], os.path.join(args.out, "tokenizer"), dirs_exist_ok=True)
      config.cond_stage.tokenizer.path = "tokenizer"  # Relative: resolved against the model dir.
    model_io.save_model(args.out, config, params)
  except (ValueError, OSError, common.WeightLoadError) as e:
    print(f"python -m ldm_jax.convert: error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {args.out}")
  return 0


def export_lora(args, lora_training) -> int:
  """--export_lora WORKDIR --out FILE.safetensors [--layout peft|kohya] [--no_ema]."""
  others = [f for f in ("compvis_ckpt", "compvis_yaml", "diffusers", "checkpoint", "lora",
                        "tokenizer") if getattr(args, f)]
  if others:
    raise ValueError(f"--export_lora reads a training workdir only; drop --{others[0]}.")
  if not args.out.endswith(".safetensors") or os.path.isdir(args.out):
    raise ValueError(f"--out={args.out}: expected a .safetensors file to write the adapters to.")
  lora = lora_training.export(args.export_lora, args.out, args.layout,
                              use_ema=args.use_ema is not False)
  print(f"Wrote {args.out}: {len(lora.updates)} adapted modules, {args.layout} layout")
  return 0


if __name__ == "__main__":
  sys.exit(main())
