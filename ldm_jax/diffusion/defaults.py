"""The diffusion section of a model config (`model.diffusion`): its fields and their defaults.

The paper's LDM settings. Experiment configs (`configs/common.py`), `LatentDiffusion` and parameter
initialisation all fill a section from here, so a model saved without a field and one built with it
spelled out agree.
"""

from typing import Any, Mapping

DEFAULTS: dict[str, Any] = dict(
    timesteps=1000,             # T of the training schedule
    beta_schedule="linear",     # 'linear' | 'sqrt_linear' | 'sqrt' | 'cosine' (schedules.make_betas)
    linear_start=0.0015,
    linear_end=0.0195,
    cosine_s=8e-3,
    zero_terminal_snr=False,    # rescale the schedule to alphas_cumprod[T - 1] = 0
    parameterization="eps",     # what the UNet predicts: 'eps' | 'x0' | 'v'
    conditioning_key=None,      # how a condition enters the UNet (models.conditioning)
    scale_factor=1.0,           # latents are multiplied by this after encoding
    scale_by_std=False,         # training sets scale_factor to 1 / std of the first batch's latents
    image_size=32,              # latent size the model was trained at
    channels=4,                 # latent channels
)


def with_defaults(section: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """DEFAULTS updated by `section` (fields beyond DEFAULTS, e.g. model_target, are kept)."""
  return {**DEFAULTS, **dict(section or {})}
