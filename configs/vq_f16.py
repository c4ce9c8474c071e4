"""Stage 1: the paper's VQ-regularised f=16 autoencoder (256 px -> 16x16x8, 16384 codes).

The VQ-f16 first stage of Rombach et al. 2022 (first-stage table, Tab. 8); same network and loss
as `models/first_stage_models/vq-f16/config.yaml` (attention at the 16 px level).

  python train.py --config configs/vq_f16.py --workdir workdirs/vq_f16 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/vq_f16.py:tiny --workdir /tmp/vq_f16_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same five levels + attention).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  c.stage = "autoencoder"
  c.data.source = "folder"           # OpenImages train images; set --config.data.data_dir.
  c.data.image_size = 256
  c.data.random_crop = True          # The released data config crops 256 px from 384 px images.
  c.data.min_size = 256
  c.data.batch_size = 14             # Released per-GPU batch; the lr scales with it.
  c.model.first_stage = common.first_stage(
      "vq", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,),        # Pixel resolution: the lowest (16 px) level attends.
      resolution=256, z_channels=8, embed_dim=8, n_embed=16384)
  c.train.num_steps = 500_000        # Not in the released config; long enough for disc_start.
  c.train.use_ema = False            # The CompVis autoencoders keep no EMA copy.
  c.loss.kind = "vq"
  c.loss.base_learning_rate = 4.5e-6  # x global batch x accumulation, as CompVis main.py does.
  c.loss.disc_start = 250001         # The released f16 model starts the GAN term late.
  c.loss.disc_weight = 0.75
  c.loss.disc_num_layers = 2
  c.loss.codebook_weight = 1.0
  c.checkpoint.every = 5000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.random_crop = False
    c.data.min_size = 0
    c.model.first_stage = common.first_stage(
        "vq", ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
        resolution=64, z_channels=8, embed_dim=8, n_embed=256)
    c.loss.disc_start = 1
    c.loss.disc_ndf = 16
    c.loss.allow_no_lpips = True
  elif arg:
    raise ValueError(f"configs/vq_f16.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
