"""Stage 1: the paper's KL-regularised f=4 autoencoder (256 px -> 64x64x3 latents) on OpenImages.

Reproduces the KL-f4 row of the first-stage table (Rombach et al. 2022, Tab. 8: rFID 0.27,
PSNR 27.53 on ImageNet-val 256^2); same network as `models/first_stage_models/kl-f4/config.yaml`.

  python train.py --config configs/kl_f4.py --workdir workdirs/kl_f4 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/kl_f4.py:tiny --workdir /tmp/kl_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same three levels).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  common.autoencoder_training(c, common.first_stage(
      "kl", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
      z_channels=3, embed_dim=3), batch_size=10)
  c.loss.disc_start = 50001          # Adversarial term only after the reconstruction settles.
  c.loss.kl_weight = 1e-6            # Only a slight KL pull towards N(0, 1).
  c.loss.disc_weight = 0.5
  if arg == "tiny":
    common.tiny_autoencoder_training(c, common.first_stage(
        "kl", ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), resolution=64,
        z_channels=3, embed_dim=3))
  elif arg:
    raise ValueError(f"configs/kl_f4.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
