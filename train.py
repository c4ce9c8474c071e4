"""Trains an autoencoder (stage 1) or a latent diffusion model (stage 2) from a config file.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae
  python train.py --config configs/shapes_ldm_text.py --workdir workdirs/shapes_ldm \
      --config.first_stage_checkpoint=workdirs/shapes_ae
  python train.py --config configs/cin256_v2.py:tiny --workdir /tmp/cin --config.train.num_steps=2

An existing --workdir resumes from its newest readable checkpoint; a workdir another train.py is
still training in is refused (exit code 2). Flags of the form --config.a.b=value
override single config fields. The logic is ldm_jax/cli/train.py.
"""

from absl import app

from ldm_jax.cli import train as cli_train

if __name__ == "__main__":
  cli_train.define_flags()
  app.run(cli_train.main)
