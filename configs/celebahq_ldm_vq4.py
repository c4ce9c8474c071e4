"""Stage 2: unconditional LDM-4 on CelebA-HQ 256 (VQ-f4 latents, 64x64x3).

Reproduces the CelebA-HQ row of the paper's unconditional table (Rombach et al. 2022, Tab. 1:
LDM-4, FID 5.11; hyperparameters Tab. 12: 274M parameters, batch 48, 410k steps, lr 9.6e-5);
the network of `configs/latent-diffusion/celebahq-ldm-vq-4.yaml`.

  python train.py --config configs/celebahq_ldm_vq4.py --workdir workdirs/celebahq_ldm \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/tfds
  python train.py --config configs/celebahq_ldm_vq4.py:tiny --workdir /tmp/celebahq_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, with the `vq_f4:tiny` first stage).
"""

from configs import common
from configs import vq_f4


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/celebahq_ldm_vq4.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "tfds"
  c.data.name = "celeb_a_hq/256"     # TFDS needs the manually prepared CelebA-HQ files.
  c.data.image_size = 256
  c.data.batch_size = 48
  # The same VQ-f4 network as configs/vq_f4.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = vq_f4.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
      attention_resolutions=(8, 4, 2),  # Down-sampling factors: latent 8, 16 and 32 px levels.
      num_head_channels=32)             # Heads of 32 channels each, whatever the level width.
  # VQ latents are diffused before quantisation and have about unit scale: scale_factor 1.
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0195, image_size=64,
                                       channels=3)
  c.train.num_steps = 410_000
  c.train.learning_rate = 2e-6       # Per example: x batch 48 = the paper's 9.6e-5.
  c.train.scale_lr_by_batch = True
  c.train.ema_decay = 0.9999
  c.checkpoint.every = 10_000
  c.log.every = 100
  c.log.sample_every = 10_000
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.name = ""
    c.data.image_size = 64           # -> 16x16x3 latents through the tiny VQ-f4.
    c.model.unet = common.unet_kwargs(
        in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_head_channels=32)
    c.model.diffusion.image_size = 16
  return c
