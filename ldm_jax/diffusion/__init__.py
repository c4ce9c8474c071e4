"""ldm_jax.diffusion: schedules, objectives, samplers, guidance and tiled decoding.

Pure functions over arrays; networks enter only as a `denoise(x_t, t, cond)` callable.
"""

from ldm_jax.diffusion.guidance import classifier_free_guidance, img2img, inpaint
from ldm_jax.diffusion.objectives import (diffusion_loss, predict_eps_from_v, predict_eps_from_x0,
                                          predict_x0_from_eps, predict_x0_from_v, q_sample,
                                          v_target)
from ldm_jax.diffusion.samplers import SAMPLERS, sample, sampler_timesteps
from ldm_jax.diffusion.schedules import Schedule, make_betas, rescale_zero_terminal_snr
from ldm_jax.diffusion.tiling import tiled_decode

__all__ = [
    'SAMPLERS', 'Schedule', 'classifier_free_guidance', 'diffusion_loss', 'img2img', 'inpaint',
    'make_betas', 'predict_eps_from_v', 'predict_eps_from_x0', 'predict_x0_from_eps',
    'predict_x0_from_v', 'q_sample', 'rescale_zero_terminal_snr', 'sample', 'sampler_timesteps',
    'tiled_decode', 'v_target',
]
