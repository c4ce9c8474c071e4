"""Stage 1: the paper's KL-regularised f=16 autoencoder (256 px -> 16x16x16 latents) on OpenImages.

Reproduces the KL-f16 row of the first-stage table (Rombach et al. 2022, Tab. 8: rFID 0.87,
PSNR 24.08 on ImageNet-val 256^2); same network as `models/first_stage_models/kl-f16/config.yaml`,
which adds self-attention at the 16 px level.

  python train.py --config configs/kl_f16.py --workdir workdirs/kl_f16 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/kl_f16.py:tiny --workdir /tmp/kl_f16_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same five levels + attention).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  common.autoencoder_training(c, common.first_stage(
      "kl", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,),        # Pixel resolution: the lowest (16 px) level attends.
      resolution=256, z_channels=16, embed_dim=16), batch_size=6)
  c.loss.disc_start = 50001
  c.loss.kl_weight = 1e-6
  c.loss.disc_weight = 0.5
  if arg == "tiny":
    # At 64 px the lowest level is 4 px: attention stays on that same level.
    common.tiny_autoencoder_training(c, common.first_stage(
        "kl", ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
        resolution=64, z_channels=16, embed_dim=16))
  elif arg:
    raise ValueError(f"configs/kl_f16.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
