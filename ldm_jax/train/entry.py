"""The entry point behind train.py: validates the config, locks the workdir, runs the stage."""

import logging
import os

from ldm_jax import parallel
from ldm_jax import validate
from ldm_jax.convert import common
from ldm_jax.model_io import CheckpointNotFoundError
from ldm_jax.train import checkpoint as checkpoint_lib
from ldm_jax.train import workdir as workdir_lib

log = logging.getLogger("ldm_jax.train")


class UserError(Exception):
  """A mistake in the user's config, flags or files: printed as one line, exit code 2."""


def train(config, workdir: str) -> dict:
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
      if config.stage == "autoencoder":
        from ldm_jax.train import ae_trainer
        return ae_trainer.train(config, workdir)
      from ldm_jax.train import ldm_trainer
      return ldm_trainer.train(config, workdir)
  except (CheckpointNotFoundError, common.WeightLoadError, FileNotFoundError,
          workdir_lib.WorkdirBusyError, checkpoint_lib.CheckpointRestoreError) as e:
    raise UserError(str(e)) from None
