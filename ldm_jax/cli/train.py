"""train.py: check the config, lock the workdir, run the stage; user mistakes exit with code 2.

`train(config, workdir)` is what train.py runs once the flags are parsed (tests call it too);
`define_flags` and `main` are the command line itself, kept out of import time so that importing
this module defines no absl flags.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ldm_jax import compile_cache
from ldm_jax import parallel
from ldm_jax import validate
from ldm_jax.cli import common as cli
from ldm_jax.errors import UserError
from ldm_jax.train import ae_trainer
from ldm_jax.train import classifier_task
from ldm_jax.train import ldm_trainer
from ldm_jax.train import workdir as workdir_lib

FLAGS = flags.FLAGS
log = logging.getLogger("ldm_jax.train")
# config.stage -> the module whose `train(config, workdir)` runs it; the names are validate.STAGES.
TRAINERS = {"autoencoder": ae_trainer, "ldm": ldm_trainer, "classifier": classifier_task}


def train(config, workdir: str) -> dict:
  """Trains `config`'s stage in `workdir` (resuming it); returns the last step's summary.

  Raises UserError for everything the user can fix: the config, the files it names, a workdir
  another trainer holds, checkpoints none of which can be restored.
  """
  # Before validate: its mesh check counts devices, which starts the XLA backend, and
  # jax.distributed.initialize must come first on multi-process runs.
  parallel.maybe_initialize_distributed()
  try:
    validate.check_config(config)
  except ValueError as e:
    raise UserError(str(e)) from None
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  try:
    # Held for the whole run, before the first file is written: a second trainer on this
    # workdir stops here, having changed nothing.
    with workdir_lib.TrainerLock(workdir):
      return TRAINERS[config.stage].train(config, workdir)
  # The library's own errors (a busy workdir, unreadable checkpoints, weights that do not fit)
  # are UserErrors already; a file the config names that does not exist may be a plain one.
  except UserError:
    raise
  except FileNotFoundError as e:
    raise UserError(str(e)) from None


def define_flags() -> None:
  """train.py's flags: --config (with --config.a.b=value overrides), --workdir, the cache."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  flags.DEFINE_string("compilation_cache", None,
                      "JAX's persistent compilation cache directory, or 'off' (default: "
                      "$LDM_JAX_COMPILATION_CACHE, else ~/.cache/ldm_jax/jax).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  # Orbax and JAX log every checkpoint step at INFO; keep ldm_jax's own messages only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("ldm_jax").setLevel(logging.INFO)
  try:
    try:
      compile_cache.enable(FLAGS.compilation_cache)
    except OSError as e:
      raise UserError(f"--compilation_cache: {e}") from None
    train(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    sys.exit(cli.report("train.py", e))
