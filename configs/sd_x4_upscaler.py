"""Stage 2: fine-tunes the Stable Diffusion x4 upscaler (`x4-upscaling.yaml`).

LatentUpscaleDiffusion: KL-f4 latents (scale factor 0.08333) of the high-resolution image; the
low-resolution image (a quarter of the size, i.e. the latents' size) noised to a random level in
[0, max_noise_level) by its own schedule and concatenated to z_t; that level embedded as the UNet's
class label; the prompt by cross-attention ('hybrid-adm'); v-prediction. The low-resolution input
is the image downsampled by bicubic interpolation. Sampling takes `--lowres` and `--noise_level`.

  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-x4-upscaler --out models/sd_x4_upscaler
Variants: '' (fine-tuning from models/sd_x4_upscaler on 512 px crops), 'tiny' (2 CPU steps on
shapes with the tiny KL-f4 of configs/kl_f4.py:tiny, a fresh miniature model).
"""

from configs import common
from configs import kl_f4
from configs import sd_v2_finetune

INIT_FROM = "models/sd_x4_upscaler"  # Placeholder: the `--out` folder of ldm_jax.convert.
MAX_NOISE_LEVEL = 350


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/sd_x4_upscaler.py: unknown variant {arg!r}; expected '' or "
                     f"'tiny'.")
  tiny = arg == "tiny"
  c = sd_v2_finetune.get_config("base_tiny" if tiny else "base")
  if tiny:
    c.model.first_stage = kl_f4.get_config("tiny").model.first_stage  # 64 px -> 16x16x3.
  else:
    c.model.first_stage = common.first_stage(
        "kl", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
        z_channels=4, embed_dim=4)
  latent = int(c.model.first_stage.kwargs.z_channels)
  image = 64 if tiny else 512
  c.data.image_size = image
  c.data.min_size = 0 if tiny else image
  c.model.diffusion = common.diffusion(
      linear_start=0.0001, linear_end=0.02, parameterization="v", conditioning_key="hybrid-adm",
      scale_factor=0.08333, image_size=image // 4, channels=latent)
  d = c.model.diffusion
  d.model_target = "LatentUpscaleDiffusion"  # = ldm_jax.family.UPSCALE_TARGET
  d.low_scale = dict(beta_schedule="linear", timesteps=1000, linear_start=0.0001,
                     linear_end=0.02, max_noise_level=MAX_NOISE_LEVEL)
  if tiny:
    c.model.unet = common.unet_kwargs(
        in_channels=latent + 3, out_channels=latent, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32,
        use_spatial_transformer=True, transformer_depth=1, use_linear_in_transformer=True,
        context_dim=64, num_classes=1000, legacy=False)
    return c
  c.model.unet = common.unet_kwargs(
      in_channels=latent + 3,            # z_t and the noised low-resolution RGB image.
      out_channels=latent, model_channels=256, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
      attention_resolutions=(2, 4, 8), num_heads=8, use_spatial_transformer=True,
      transformer_depth=1, use_linear_in_transformer=True, context_dim=1024,
      num_classes=1000,                  # The noise level's embedding table (levels < 350 used).
      legacy=False)
  # Cross-attention only in the three high-resolution levels; self-attention at the lowest.
  c.model.unet["disable_self_attentions"] = (True, True, True, False)
  c.model.unet["disable_middle_self_attn"] = False
  c.model.sampling = common.sampling(guidance=9.0, steps=75)  # diffusers' upscale pipeline defaults.
  c.init_from = INIT_FROM
  return c
