"""The errors a caller can act on: one hierarchy for the whole package.

Library code raises these with a message naming the field (or file), the value and what was
expected; it never prints and never exits. The command lines (`ldm_jax/cli/`) catch `UserError`,
print its message as one line and exit with code 2. Anything else is a bug and keeps its traceback.

  UserError                                 bad input, settings or files (exit code 2)
    InputError (ValueError)                 a setting out of range, inputs that do not fit
    ConfigError (ValueError)                a config (or a saved model's config.json) no model fits
    CheckpointError (ValueError)            a checkpoint file missing, malformed or unsupported
      CheckpointNotFoundError (FileNotFoundError)   nothing to load at the path
    WeightLoadError (ValueError)            weights that do not fit the model's config
    CheckpointRestoreError (OSError)        no complete training checkpoint can be restored
    WorkdirBusyError (RuntimeError)         another trainer holds the workdir

The second bases keep `except ValueError` / `except FileNotFoundError` callers working.
"""


class UserError(Exception):
  """A mistake in the caller's flags, config or files; the message is meant for the user."""


class InputError(UserError, ValueError):
  """An argument or setting out of range, or inputs that do not fit together or the model."""


class ConfigError(UserError, ValueError):
  """A config, or a saved model's config.json, that no model can be built from."""


class CheckpointError(UserError, ValueError):
  """A checkpoint file is missing, malformed or of an unsupported kind."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """Nothing to load at the given path: no checkpoint file, model directory or workdir."""


class WeightLoadError(UserError, ValueError):
  """Weights that do not fit the model exactly (missing, unexpected or misshapen tensors)."""


class CheckpointRestoreError(UserError, OSError):
  """No complete checkpoint of a workdir could be restored."""


class WorkdirBusyError(UserError, RuntimeError):
  """Another trainer holds the workdir's lock."""
