"""Trains an autoencoder (stage 1) or a latent diffusion model (stage 2) from a config file.

  python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae
  python train.py --config configs/shapes_ldm_text.py --workdir workdirs/shapes_ldm \
      --config.first_stage_checkpoint=workdirs/shapes_ae
  python train.py --config configs/cin256_v2.py:tiny --workdir /tmp/cin --config.train.num_steps=2

An existing --workdir resumes from its newest readable checkpoint; a workdir another train.py is
still training in is refused (exit code 2). Flags of the form --config.a.b=value
override single config fields.
"""

import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ldm_jax import compile_cache
from ldm_jax.train import entry

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("compilation_cache", None,
                    "JAX's persistent compilation cache directory, or 'off' (default: "
                    "$LDM_JAX_COMPILATION_CACHE, else ~/.cache/ldm_jax/jax).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and JAX log every checkpoint step at INFO; keep ldm_jax's own messages only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("ldm_jax").setLevel(logging.INFO)
  try:
    try:
      compile_cache.enable(FLAGS.compilation_cache)
    except OSError as e:
      raise entry.UserError(f"--compilation_cache: {e}") from None
    entry.train(FLAGS.config, FLAGS.workdir)
  except entry.UserError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
