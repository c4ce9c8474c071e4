"""Stage 2: unconditional LDM-8 on LSUN-Churches 256 (KL-f8 latents, 32x32x4).

Reproduces the LSUN-Churches row of the paper's unconditional table (Rombach et al. 2022, Tab. 1:
LDM-8, FID 4.02; hyperparameters Tab. 12: 294M parameters, batch 96, 500k steps, lr 5e-5); the
network of `configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml`: BigGAN-style scale-shift norm
and residual up/down-sampling blocks, L1 loss, and a latent scale set from the data (1 / std).

  python train.py --config configs/lsun_churches_ldm_kl8.py --workdir workdirs/churches_ldm \
      --config.first_stage_checkpoint=workdirs/kl_f8 --config.data.data_dir=/data/tfds
  python train.py --config configs/lsun_churches_ldm_kl8.py:tiny --workdir /tmp/churches_tiny \
      --config.first_stage_checkpoint=/tmp/kl_f8_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, with the `kl_f8:tiny` first stage).
"""

from configs import common
from configs import kl_f8


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/lsun_churches_ldm_kl8.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "tfds"
  c.data.name = "lsun/church_outdoor"  # Non-square scenes: centre crop, resize to 256 px.
  c.data.image_size = 256
  c.data.random_flip = True          # CompVis LSUN loader flips with p = 0.5.
  c.data.batch_size = 96
  # The same KL-f8 network as configs/kl_f8.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = kl_f8.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
      attention_resolutions=(1, 2, 4, 8),  # Every level but the last (32, 16, 8, 4 px) attends.
      num_heads=8,                        # Fixed head count: head width grows with the level.
      use_scale_shift_norm=True,          # GN(h) * (1 + scale(t)) + shift(t).
      resblock_updown=True)               # Resample inside ResBlocks instead of plain convs.
  # scale_by_std: scale_factor = 1 / std(z) of the first training batch, stored with the model.
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0155, scale_by_std=True,
                                       image_size=32, channels=4)
  c.train.loss_type = "l1"
  c.train.num_steps = 500_000
  c.train.learning_rate = 5e-5       # Used as is: the released run disabled lr scaling.
  c.train.scale_lr_by_batch = False
  c.train.ema_decay = 0.9999
  c.checkpoint.every = 10_000
  c.log.every = 100
  c.log.sample_every = 10_000
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.name = ""
    c.data.image_size = 64           # -> 8x8x4 latents through the tiny KL-f8.
    c.model.unet = common.unet_kwargs(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_heads=8, use_scale_shift_norm=True,
        resblock_updown=True)
    c.model.diffusion.image_size = 8
  return c
