"""Stage 2: unconditional LDM-4 on LSUN-Bedrooms 256 (VQ-f4 latents, 64x64x3).

Reproduces the LSUN-Bedrooms row of the paper's unconditional table (Rombach et al. 2022, Tab. 1:
LDM-4, FID 2.95; hyperparameters Tab. 12: batch 48, 1.9M steps, lr 9.6e-5); the network of
`configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml` (identical to the CelebA-HQ model).

  python train.py --config configs/lsun_bedrooms_ldm_vq4.py --workdir workdirs/beds_ldm \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/tfds
  python train.py --config configs/lsun_bedrooms_ldm_vq4.py:tiny --workdir /tmp/beds_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, with the `vq_f4:tiny` first stage).
"""

from configs import celebahq_ldm_vq4


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/lsun_bedrooms_ldm_vq4.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = celebahq_ldm_vq4.get_config(arg)
  if arg == "tiny":
    return c                         # The same tiny model on shapes.
  c.data.name = "lsun/bedroom"       # Non-square scenes: centre crop, resize to 256 px.
  c.data.random_flip = True          # CompVis LSUN loader flips with p = 0.5.
  c.train.num_steps = 1_900_000
  c.train.learning_rate = 2e-6       # Per example: x batch 48 = the paper's 9.6e-5.
  return c
