"""Stage 2: fine-tunes Stable Diffusion 2.x depth-to-image (512 px, `v2-midas-inference.yaml`).

The 512-base network (configs/sd_v2_finetune.py:base) with a fifth UNet input: the image's depth
map resized to the latents and normalised to [-1, 1] per image; the prompt by cross-attention
('hybrid'). No depth estimator is bundled (the original runs MiDaS): training batches must carry a
`depth` map per image, and sampling takes `--depth_map`. The tiny variant trains on the built-in
shapes, whose flat objects lie in front of the background (depth 1 on an object, 0 elsewhere).

  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-2-depth --out models/sd2_depth
Variants: '' (fine-tuning from models/sd2_depth), 'tiny' (2 CPU steps on shapes, a fresh
miniature model).
"""

from configs import sd_v2_finetune

INIT_FROM = "models/sd2_depth"  # Placeholder: the `--out` folder of ldm_jax.convert.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/sd_v2_depth.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = sd_v2_finetune.get_config("base_tiny" if arg == "tiny" else "base")
  latent = c.model.diffusion.channels
  c.model.unet.in_channels = latent + 1        # z_t and the depth map.
  c.model.unet.out_channels = latent
  d = c.model.diffusion
  d.conditioning_key = "hybrid"
  d.model_target = "LatentDepth2ImageDiffusion"  # = ldm_jax.family.DEPTH_TARGET
  d.depth_eps = 0.001                            # The original's normalisation (diffusers: 0).
  if arg != "tiny":
    c.init_from = INIT_FROM
  return c
