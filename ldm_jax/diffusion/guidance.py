"""Classifier-free guidance, and img2img / inpainting front ends over `samplers.sample`.

CFG (Ho & Salimans 2022) runs the network once on the doubled batch [uncond; cond] (uncond first, as
CompVis and diffusers order it) and combines e = e_u + s (e_c - e_u). The combination is affine with
weights summing to 1, so it is the same whether the network predicts eps, x0 or v. Guidance rescale
(Lin et al. 2023, Alg. 2) matches the per-example std of the guided output to the conditional one
and mixes by `rescale`; it is applied to the raw output (v for v models, as in the paper; eps for
eps models, as diffusers does).

img2img and inpainting themselves live in the sampler loop (`sample(..., x0=, strength=, mask=)`) so
that they work with every sampler; the helpers here only name the two uses.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.samplers import sample
from ldm_jax.diffusion.schedules import Schedule


def rescale_guidance(guided: jnp.ndarray, cond_out: jnp.ndarray, rescale: float) -> jnp.ndarray:
  """Lin et al. 2023 guidance rescale: mixes in guided * std(cond) / std(guided) by `rescale`.

  Stds are per example over all non-batch axes, unbiased (ddof=1) as torch.std computes them.
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)  # [B, 1, 1, 1]
  std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  rescaled = guided * (std_cond / std_guided)
  return rescale * rescaled + (1.0 - rescale) * guided


def combine_guidance(out_uncond: jnp.ndarray, out_cond: jnp.ndarray, scale,
                     rescale=0.0) -> jnp.ndarray:
  """e_u + scale (e_c - e_u), then guidance rescale; scale and rescale may be traced scalars."""
  out_uncond = out_uncond.astype(jnp.float32)
  out_cond = out_cond.astype(jnp.float32)
  guided = out_uncond + scale * (out_cond - out_uncond)
  if isinstance(rescale, (int, float)) and rescale == 0.0:
    return guided
  return rescale_guidance(guided, out_cond, rescale)


def classifier_free_guidance(denoise: Callable, scale: float, rescale: float = 0.0) -> Callable:
  """Wraps `denoise(x, t, cond)` into a guided denoise over a (uncond, cond[, shared]) tuple.

  The wrapped function takes cond = (uncond, cond) whose leaves have the batch B on axis 0; they are
  concatenated to 2B and `denoise` runs once on ([x; x], [t; t], [uncond; cond]). With a third
  element `shared` (e.g. the network parameters, which must not be concatenated), `denoise` receives
  ([uncond; cond], shared) as its cond. Returns the guided output [B, H, W, C] in fp32.
  Keep the wrapper (it is a static argument of `sample`): making a new one recompiles the loop. To
  change the scale without recompiling, carry it in cond and call `combine_guidance` yourself.
  """
  if rescale < 0.0 or rescale > 1.0:
    raise ValueError(f'rescale={rescale!r}: expected 0 <= rescale <= 1')

  def guided(x, t, cond):
    if not isinstance(cond, (tuple, list)) or len(cond) not in (2, 3):
      raise ValueError(f'cond of a guided denoise: expected a tuple (uncond, cond) or '
                       f'(uncond, cond, shared), got {type(cond).__name__}')
    batch = x.shape[0]
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), cond[0], cond[1])
    if len(cond) == 3:
      both = (both, cond[2])
    x2 = jnp.concatenate([x, x], axis=0)  # [2B, H, W, C]
    t2 = jnp.concatenate([t, t], axis=0)  # [2B]
    out = denoise(x2, t2, both)  # [2B, H, W, C]
    return combine_guidance(out[:batch], out[batch:], scale, rescale)

  return guided


def img2img(denoise: Callable, schedule: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, cond: Any,
            rng: jax.Array, *, strength: float, sampler: str = 'ddim', steps: int = 50,
            **kwargs):
  """SDEdit-style img2img: noise x0 to the grid step `strength` selects, then sample from there.

  strength 1.0 starts from pure noise at the top of the grid (x0 is then unused); smaller values
  keep more of x0. See `samplers_base.img2img_skip` for the start index (diffusers' rule).
  """
  return sample(denoise, schedule, noise, cond, rng, sampler=sampler, steps=steps, x0=x0,
                strength=strength, **kwargs)


def inpaint(denoise: Callable, schedule: Schedule, x0: jnp.ndarray, mask: jnp.ndarray,
            noise: jnp.ndarray, cond: Any, rng: jax.Array, *, sampler: str = 'ddim',
            steps: int = 50, strength: Optional[float] = None, **kwargs):
  """Inpainting by latent masking: mask [B, H, W, 1|C] is 1 where x0 is kept, 0 where generated.

  Before each step the known region is replaced by q_sample(x0, t); after the last step x0 is pasted
  back, so the known region of the result equals x0 exactly.
  """
  return sample(denoise, schedule, noise, cond, rng, sampler=sampler, steps=steps, x0=x0,
                mask=mask, strength=strength, **kwargs)
