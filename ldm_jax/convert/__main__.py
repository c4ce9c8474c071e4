"""Converts original weights into an ldm_jax model directory that sample.py reads.

  python -m ldm_jax.convert --compvis_ckpt sd-v1-5.ckpt --compvis_yaml v1-inference.yaml \
      --tokenizer /path/to/clip_tokenizer --out models/sd15
  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-v1-5 --out models/sd15
  python -m ldm_jax.convert --checkpoint models/sd15 --lora style.safetensors:0.8 \
      --lora detail.safetensors --out models/sd15_style

The output holds config.json, params/ (Orbax) and, for text models, a copy of the tokenizer.
--lora FILE[:SCALE] (repeatable) merges LoRA files (diffusers/PEFT or Kohya layout) into the weights,
on an import or into an already converted model (--checkpoint).
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
                 help="merge a LoRA .safetensors file, scaled (default 1); repeatable")
  p.add_argument("--tokenizer", help="local tokenizer directory for text models (.ckpt sources)")
  ema = p.add_mutually_exclusive_group()
  ema.add_argument("--use_ema", dest="use_ema", action="store_true", default=None,
                   help="CompVis: take the model_ema.* weights (default: when present)")
  ema.add_argument("--no_ema", dest="use_ema", action="store_false",
                   help="CompVis: take the raw weights even when EMA copies exist")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  # After parsing: --help and flag mistakes answer without loading JAX and the converters.
  from ldm_jax import model_io
  from ldm_jax.convert import common
  from ldm_jax.convert import lora
  from ldm_jax.convert import pipeline
  try:
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
      params = lora.merge_files(config, params, args.lora)
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


if __name__ == "__main__":
  sys.exit(main())
