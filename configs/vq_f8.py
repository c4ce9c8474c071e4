"""Stage 1: the paper's VQ-regularised f=8 autoencoder (256 px -> 32x32x4, 16384 codes).

Reproduces the VQ-f8 row of the first-stage table (Rombach et al. 2022, Tab. 8: rFID 1.14,
PSNR 23.07 on ImageNet-val 256^2); same network and loss as
`models/first_stage_models/vq-f8/config.yaml` (attention at the 32 px level).

  python train.py --config configs/vq_f8.py --workdir workdirs/vq_f8 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/vq_f8.py:tiny --workdir /tmp/vq_f8_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same four levels + attention).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  common.autoencoder_training(c, common.first_stage(
      "vq", ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(32,),        # Pixel resolution: the lowest (32 px) level attends.
      resolution=256, z_channels=4, embed_dim=4, n_embed=16384), batch_size=10)
  c.loss.disc_start = 1
  c.loss.disc_weight = 0.6           # The released VQ-f8 uses 0.6 (the other VQ models 0.75).
  c.loss.disc_num_layers = 2         # A shallower PatchGAN, as released.
  c.loss.codebook_weight = 1.0
  if arg == "tiny":
    # 64 px / 4: attention on the same lowest level (8 px).
    common.tiny_autoencoder_training(c, common.first_stage(
        "vq", ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
        resolution=64, z_channels=4, embed_dim=4, n_embed=256))
  elif arg:
    raise ValueError(f"configs/vq_f8.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
