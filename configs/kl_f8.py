"""Stage 1: the paper's KL-regularised f=8 autoencoder (256 px -> 32x32x4 latents) on OpenImages.

Reproduces the KL-f8 row of the first-stage table (Rombach et al. 2022, Tab. 8: rFID 0.90,
PSNR 24.19 on ImageNet-val 256^2) and is the first stage of LSUN-Churches, the LAION text-to-image
model and Stable Diffusion (same network as `models/first_stage_models/kl-f8/config.yaml`).

  python train.py --config configs/kl_f8.py --workdir workdirs/kl_f8 \
      --config.data.data_dir=/data/openimages/train --config.loss.lpips_path=lpips_vgg.npz
  python train.py --config configs/kl_f8.py:tiny --workdir /tmp/kl_f8_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 64 px, same four levels).
"""

from configs import common

# Pixel resolutions of the AttnBlocks in the released config (none for KL-f8).
ATTN_RESOLUTIONS = ()


def get_config(arg: str = ""):
  c = common.base_config()
  common.autoencoder_training(c, common.first_stage(
      "kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=ATTN_RESOLUTIONS,
      resolution=256, z_channels=4, embed_dim=4), batch_size=4)
  c.loss.disc_start = 50001          # Adversarial term only after the reconstruction settles.
  c.loss.kl_weight = 1e-6            # Only a slight KL pull towards N(0, 1): latents stay detailed.
  c.loss.disc_weight = 0.5           # Multiplies the adaptive (gradient-norm matched) GAN weight.
  if arg == "tiny":
    # Same four levels (f=8); 32 channels and one block per level keep it a CPU-sized network.
    common.tiny_autoencoder_training(c, common.first_stage(
        "kl", ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=(), resolution=64,
        z_channels=4, embed_dim=4))
  elif arg:
    raise ValueError(f"configs/kl_f8.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
