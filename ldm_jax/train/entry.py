"""The entry point behind train.py: validates the config, then runs the configured stage."""

import logging
import os

from ldm_jax import parallel
from ldm_jax import validate
from ldm_jax.convert import common
from ldm_jax.model_io import CheckpointNotFoundError

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
  workdir = os.path.abspath(workdir)
  try:
    if config.stage == "autoencoder":
      from ldm_jax.train import ae_trainer
      return ae_trainer.train(config, workdir)
    from ldm_jax.train import ldm_trainer
    return ldm_trainer.train(config, workdir)
  except (CheckpointNotFoundError, common.WeightLoadError, FileNotFoundError) as e:
    raise UserError(str(e)) from None
