"""Stage 1: the paper's KL-regularised f=32 autoencoder (256 px -> 8x8x64 latents) on OpenImages.

The KL-f32 first stage of Rombach et al. 2022 (first-stage table, Tab. 8); same network as
`models/first_stage_models/kl-f32/config.yaml`, with self-attention at the 16 and 8 px levels.

  python train.py --config configs/kl_f32.py --workdir workdirs/kl_f32 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/kl_f32.py:tiny --workdir /tmp/kl_f32_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px -> 2x2 latents, six levels).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  common.autoencoder_training(c, common.first_stage(
      "kl", ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
      attn_resolutions=(16, 8),      # Pixel resolutions of the two lowest levels.
      resolution=256, z_channels=64, embed_dim=64), batch_size=6)
  c.loss.disc_start = 50001
  c.loss.kl_weight = 1e-6
  c.loss.disc_weight = 0.5
  if arg == "tiny":
    # 64 px / 4: the same two lowest levels (4 and 2 px) attend.
    common.tiny_autoencoder_training(c, common.first_stage(
        "kl", ch=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(4, 2),
        resolution=64, z_channels=64, embed_dim=64))
  elif arg:
    raise ValueError(f"configs/kl_f32.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
