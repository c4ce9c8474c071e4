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
  common.autoencoder_training(c, common.first_stage(
      "vq", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,),        # Pixel resolution: the lowest (16 px) level attends.
      resolution=256, z_channels=8, embed_dim=8, n_embed=16384), batch_size=14)
  c.loss.disc_start = 250001         # The released f16 model starts the GAN term late.
  c.loss.disc_weight = 0.75
  c.loss.disc_num_layers = 2
  c.loss.codebook_weight = 1.0
  if arg == "tiny":
    common.tiny_autoencoder_training(c, common.first_stage(
        "vq", ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
        resolution=64, z_channels=8, embed_dim=8, n_embed=256))
  elif arg:
    raise ValueError(f"configs/vq_f16.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
