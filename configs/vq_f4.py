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
  common.autoencoder_training(c, common.first_stage(
      "vq", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
      z_channels=3, embed_dim=3, n_embed=8192), batch_size=8)
  c.loss.disc_start = 0              # The released VQ-f4 trains with the GAN term from step 0.
  c.loss.disc_weight = 0.75
  c.loss.codebook_weight = 1.0       # Codebook + commitment (beta 0.25) term of the VQ loss.
  if arg == "tiny":
    common.tiny_autoencoder_training(c, common.first_stage(
        "vq", ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), resolution=64,
        z_channels=3, embed_dim=3, n_embed=256))  # A small codebook: shapes has few colours.
  elif arg:
    raise ValueError(f"configs/vq_f4.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
