"""Stage 1 on the built-in shapes dataset: a small KL-f4 autoencoder (64 px -> 16x16x4 latents).

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae
Variants: '' (the quickstart run), 'tiny' (2 steps, for smoke tests).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base_config()
  c.stage = "autoencoder"
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.batch_size = 16
  c.model.first_stage = common.first_stage("kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                           resolution=64, z_channels=4, embed_dim=4)
  c.train.num_steps = 1500
  c.loss.kind = "kl"
  c.loss.base_learning_rate = 1e-3 / 16  # x batch size: Adam lr 1e-3 for this small model.
  c.loss.kl_weight = 1e-6
  c.loss.disc_start = 1000       # The GAN term switches on for the last third of the run.
  c.loss.disc_weight = 0.5
  c.loss.disc_ndf = 32
  c.loss.disc_num_layers = 2
  c.loss.allow_no_lpips = True   # The quickstart has no LPIPS weights file; L1 + GAN + KL only.
  c.checkpoint.every = 500
  c.log.every = 25
  if arg == "tiny":
    common.tiny_training(c)
    c.model.first_stage.kwargs.ch = 32
    c.loss.disc_start = 1
  elif arg:
    raise ValueError(f"configs/shapes_autoencoder.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c
