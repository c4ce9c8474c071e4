"""Stage 1: the paper's VQ-regularised f=4 autoencoder (256 px -> 64x64x3, 8192 codes).

Reproduces the VQ-f4 row of the first-stage table (Rombach et al. 2022, Tab. 8: rFID 0.58,
PSNR 27.43 on ImageNet-val 256^2); same network as `models/first_stage_models/vq-f4/config.yaml`.
It is the first stage of the CelebA-HQ / FFHQ / LSUN-Bedrooms, ImageNet, super-resolution,
layout-to-image and semantic-synthesis LDMs (the inpainting LDM uses its attention-free twin).

  python train.py --config configs/vq_f4.py --workdir workdirs/vq_f4 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/vq_f4.py:tiny --workdir /tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same three levels).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  c.stage = "autoencoder"
  c.data.source = "folder"           # OpenImages train images; set --config.data.data_dir.
  c.data.image_size = 256
  c.data.random_crop = True          # 256 px crops, as the released data config.
  c.data.min_size = 256
  c.data.batch_size = 8              # Released per-GPU batch; the lr scales with it.
  c.model.first_stage = common.first_stage(
      "vq", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
      z_channels=3, embed_dim=3, n_embed=8192)
  c.train.num_steps = 500_000        # Not in the released config.
  c.train.use_ema = False            # The CompVis autoencoders keep no EMA copy.
  c.loss.kind = "vq"
  c.loss.base_learning_rate = 4.5e-6  # x global batch x accumulation, as CompVis main.py does.
  c.loss.disc_start = 0              # The released VQ-f4 trains with the GAN term from step 0.
  c.loss.disc_weight = 0.75
  c.loss.codebook_weight = 1.0       # Codebook + commitment (beta 0.25) term of the VQ loss.
  c.checkpoint.every = 5000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.random_crop = False
    c.data.min_size = 0
    c.model.first_stage = common.first_stage(
        "vq", ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), resolution=64,
        z_channels=3, embed_dim=3, n_embed=256)  # A small codebook: shapes has few colours.
    c.loss.disc_start = 1
    c.loss.disc_ndf = 16
    c.loss.allow_no_lpips = True     # No LPIPS weights file in smoke tests.
  elif arg:
    raise ValueError(f"configs/vq_f4.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
