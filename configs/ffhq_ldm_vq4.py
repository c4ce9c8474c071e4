"""Stage 2: unconditional LDM-4 on FFHQ 256 (VQ-f4 latents, 64x64x3).

Reproduces the FFHQ row of the paper's unconditional table (Rombach et al. 2022, Tab. 1: LDM-4,
FID 4.98; hyperparameters Tab. 12: batch 42, 635k steps, lr 8.4e-5); the network of
`configs/latent-diffusion/ffhq-ldm-vq-4.yaml` (identical to the CelebA-HQ model).

  python train.py --config configs/ffhq_ldm_vq4.py --workdir workdirs/ffhq_ldm \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/ffhq/images
  python train.py --config configs/ffhq_ldm_vq4.py:tiny --workdir /tmp/ffhq_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, with the `vq_f4:tiny` first stage).
"""

from configs import celebahq_ldm_vq4


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/ffhq_ldm_vq4.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = celebahq_ldm_vq4.get_config(arg)
  if arg == "tiny":
    return c                         # The same tiny model on shapes.
  c.data.source = "folder"           # FFHQ has no TFDS builder: point data_dir at the PNG folder.
  c.data.name = ""
  c.data.image_size = 256            # Resized from 1024 px (aligned faces, no crop needed).
  c.data.batch_size = 42
  c.train.num_steps = 635_000
  c.train.learning_rate = 2e-6       # Per example: x batch 42 = the paper's 8.4e-5.
  return c
