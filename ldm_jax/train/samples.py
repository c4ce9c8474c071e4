"""Periodic sample grids during stage-2 training (EMA weights), written as PNGs in the workdir."""

import os

import numpy as np
from PIL import Image

from ldm_jax import ldm as ldm_lib
from ldm_jax import parallel
from ldm_jax import sampling
from ldm_jax import workdir_layout as layout


def sample_inputs(model: ldm_lib.LatentDiffusion, config) -> dict:
  """The prompts / labels of the grid: the config's prompts, or the first few class labels."""
  n = int(config.log.num_samples)
  if model.is_text:
    prompts = list(config.log.sample_prompts) or ["" for _ in range(n)]
    return {"prompts": [prompts[i % len(prompts)] for i in range(n)]}
  if model.cond_kind == "class":
    classes = model.null_label  # The real classes are the labels below the null one.
    return {"labels": [i % max(classes, 1) for i in range(n)]}
  return {"num_samples": n}


def log_sample_grid(model: ldm_lib.LatentDiffusion, config, workdir: str,
                    step: int, mesh=None) -> np.ndarray | None:
  """Samples the grid, writes `samples/step_NNNNNNN.png`; returns it (process 0) for TensorBoard.

  mesh: the training mesh, whose batch axes split the grid (every host gets the whole grid).
  """
  images = sampling.sample(model, steps=int(config.log.sample_steps),
                           guidance=float(config.log.sample_guidance), seed=step, mesh=mesh,
                           **sample_inputs(model, config))
  if not parallel.is_main_process():
    return None
  path = layout.sample_grid_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  grid = sampling.make_grid(ldm_lib.to_uint8(np.asarray(images)))  # [H, W, 3]
  Image.fromarray(grid).save(path)
  return grid
