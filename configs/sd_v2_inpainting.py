"""Stage 2: fine-tunes Stable Diffusion 2.x inpainting (512 px, `v2-inpainting-inference.yaml`).

The 512-base network (configs/sd_v2_finetune.py:base) with 9 UNet inputs: z_t, the hole mask at
latent resolution and the first stage's encoding of the masked image, in `concat_keys` order; the
prompt by cross-attention ('hybrid'). Training makes random holes in each image
(`data.inpaint_masks`: 'box', 'stroke' or 'mixed'); sampling takes `--init_image` and `--mask`.

  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-2-inpainting --out models/sd2_inpainting
  python train.py --config configs/sd_v2_inpainting.py --workdir workdirs/sd2_inpainting_ft \
      --config.data.data_dir=/data/captioned_images
Variants: '' (the fine-tuning run from models/sd2_inpainting), 'tiny' (2 CPU steps on shapes, a
fresh miniature model).
"""

from configs import sd_v2_finetune

INIT_FROM = "models/sd2_inpainting"  # Placeholder: the `--out` folder of ldm_jax.convert.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/sd_v2_inpainting.py: unknown variant {arg!r}; expected '' or "
                     f"'tiny'.")
  c = sd_v2_finetune.get_config("base_tiny" if arg == "tiny" else "base")
  latent = c.model.diffusion.channels
  c.model.unet.in_channels = 2 * latent + 1  # z_t, the hole mask, the masked image's latents.
  c.model.unet.out_channels = latent
  d = c.model.diffusion
  d.conditioning_key = "hybrid"               # Concat and cross-attention.
  d.model_target = "LatentInpaintDiffusion"   # = ldm_jax.family.INPAINT_TARGET
  d.concat_keys = ("mask", "masked_image")    # The released models' order.
  d.masked_image_key = "masked_image"
  if arg != "tiny":
    c.init_from = INIT_FROM
  return c
