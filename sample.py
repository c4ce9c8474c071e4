"""Samples images from a latent diffusion model on the command line.

  python sample.py --checkpoint workdirs/shapes_ldm --prompt "a red circle at the top left" \
      --num_samples 4 --outdir outputs/red_circle
  python sample.py --compvis_ckpt sd-v1-5.ckpt --compvis_yaml v1-inference.yaml \
      --tokenizer /path/to/clip_tokenizer --prompt "a photo of a cat" --guidance 7.5
  python sample.py --diffusers /path/to/stable-diffusion-folder --prompt "..." --sampler dpmpp_2m

Writes one PNG per sample (000000.png, ...), grid.png and samples.json (prompt/label, seed and
settings of every file). Mistakes in the arguments or files end with one line on stderr and exit code 2.
--lora FILE[:SCALE] (repeatable) merges LoRA files into the model. Compiled programs are kept in
JAX's persistent cache (ldm_jax/compile_cache.py), so a second run compiles nothing new.
"""

import sys

from ldm_jax import compile_cache
from ldm_jax import sample_cli
from ldm_jax.diffusion import samplers


def parse_args(argv):
  p = sample_cli.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0])
  sample_cli.add_model_arguments(p.add_argument_group("model (exactly one)"))
  what = p.add_argument_group("what to sample")
  what.add_argument("--prompt", action="append", help="text prompt (repeatable)")
  what.add_argument("--prompt_file", help="a file with one prompt per line")
  what.add_argument("--class_label", type=int, action="append", help="class label (repeatable)")
  what.add_argument("--init_image", help="img2img / inpainting input image")
  what.add_argument("--strength", type=sample_cli.finite_float, help="img2img strength in (0, 1]")
  what.add_argument("--mask", help="inpainting mask image (white = keep, black = repaint)")
  what.add_argument("--lowres", help="low-resolution image for super-resolution models")
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
  how.add_argument("--eta", type=sample_cli.finite_float, default=0.0,
                   help="DDIM noise (0 = deterministic; ddim only)")
  how.add_argument("--guidance", type=sample_cli.finite_float,
                   help="classifier-free guidance scale; default: the model's recommendation, "
                        "else 1.0 (none)")
  how.add_argument("--guidance_rescale", type=sample_cli.finite_float, default=0.0,
                   help="in [0, 1]")
  how.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; below 2**32")
  how.add_argument("--num_samples", type=int, default=1, help="samples per prompt / label")
  how.add_argument("--batch_size", type=int, default=8)
  how.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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
      raise sample_cli.UserError(f"--compilation_cache: {e}") from None
    sample_cli.run(args)
  except sample_cli.UserError as e:
    print(f"sample.py: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
