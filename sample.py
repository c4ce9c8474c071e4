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
The logic is ldm_jax/cli/sample.py.
"""

from ldm_jax.cli.sample import main, parse_args  # pylint: disable=unused-import

if __name__ == "__main__":
  main()
