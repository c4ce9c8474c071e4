"""Reading the trained weights out of a training workdir (for sampling and for stage 2)."""

import os
from typing import Any

import jax
import numpy as np

from ldm_jax.train import checkpoint as checkpoint_lib

CHECKPOINT_SUBDIR = "checkpoints"


def restore_trained_params(workdir: str, *, use_ema: bool = True) -> dict[str, Any] | None:
  """The newest checkpoint's trained parameters ({'unet': ..., ...}) as numpy, or None if none.

  EMA weights when the run kept them and `use_ema`, else the raw parameters.
  """
  ckpt_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    return None
  ckptr = checkpoint_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    if ckptr.latest_step() is None:
      return None
    state, _ = ckptr.restore()
  finally:
    ckptr.close()
  params = state.get("ema_params") if use_ema else None
  if not params:
    params = state["params"]
  return jax.tree.map(np.asarray, dict(params))
