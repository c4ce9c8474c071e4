"""The sampling entry point: each classical sampler as one jitted loop, with img2img and inpainting.

    x = sample(denoise, schedule, x_T, cond, rng, sampler='ddim', steps=50)

`denoise(x_t [B, H, W, C], t [B], cond) -> output` is any function (a UNet apply, a CFG wrapper from
`guidance`, a closed form in tests); `cond` is any pytree and is traced, so put everything that
changes between calls (text embeddings, and the network parameters too) in it: a new `cond`, `x_T`
or `rng` reuses the compiled loop. `denoise`, the sampler, the step count and the sampler settings
are static; changing them compiles a new loop.

Families and their reference implementations are described in `samplers_ddim` (ddim, plms, ddpm) and
`samplers_dpm` (dpmpp_2m, euler_ancestral).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import samplers_base as base
from ldm_jax.diffusion import samplers_ddim
from ldm_jax.diffusion import samplers_dpm
from ldm_jax.diffusion.objectives import check_parameterization
from ldm_jax.diffusion.schedules import Schedule

# The sampler registry: every name a sampler is known by, here and only here. A new sampler is a
# loop with the signature of `samplers_ddim.ddim` added to SAMPLERS (and to `sampler_timesteps`).
SAMPLERS = {
    'ddim': samplers_ddim.ddim,
    'plms': samplers_ddim.plms,
    'ddpm': samplers_ddim.ddpm,
    'dpmpp_2m': samplers_dpm.dpmpp_2m,
    'euler_ancestral': samplers_dpm.euler_ancestral,
}
# Short names the command lines have always offered, accepted wherever a sampler is named.
ALIASES = {'euler_a': 'euler_ancestral'}
# Every accepted name: the argparse choices of the command lines and the check of config fields.
NAMES = tuple(SAMPLERS) + tuple(ALIASES)


def resolve(sampler: str) -> str:
  """The registry name of `sampler` (an alias is replaced); ValueError for an unknown name."""
  name = ALIASES.get(sampler, sampler)
  if name not in SAMPLERS:
    raise ValueError(f'sampler={sampler!r}: expected one of {NAMES}')
  return name

_STATIC = ('denoise', 'sampler', 'steps', 'eta', 'parameterization', 'strength', 'grid',
           'clip_x0', 'progress', 'return_trajectory')


def _sample_impl(schedule, x_T, cond, rng, x0, mask, step_noise, *, denoise, sampler, steps, eta,
                 parameterization, strength, grid, clip_x0, progress, return_trajectory):
  """The traced body of `sample`: builds the start, runs a sampler loop, pastes the known region."""
  pure_noise = strength is None or strength >= 1.0
  skip = base.img2img_skip(steps, strength)
  x0 = None if x0 is None else x0.astype(jnp.float32)
  mask = None if mask is None else mask.astype(jnp.float32)
  x, traj = SAMPLERS[sampler](
      denoise, schedule, x_T.astype(jnp.float32), cond, rng, steps=steps, eta=eta,
      parameterization=parameterization, skip=skip, pure_noise=pure_noise, x0=x0, mask=mask,
      step_noise=step_noise, progress=progress, return_trajectory=return_trajectory, grid=grid,
      clip_x0=clip_x0)
  if mask is not None:
    x = mask * x0 + (1.0 - mask) * x  # the known region is returned exactly
  return (x, traj) if return_trajectory else x


_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC)


def sample(denoise: Callable, schedule: Schedule, x_T: jnp.ndarray, cond: Any, rng: jax.Array, *,
           sampler: str = 'ddim', steps: int = 50, eta: float = 0.0,
           parameterization: str = 'eps', x0: Optional[jnp.ndarray] = None,
           mask: Optional[jnp.ndarray] = None, strength: Optional[float] = None,
           grid: str = 'uniform', clip_x0: bool = False, progress: bool = False,
           return_trajectory: bool = False, step_noise: Optional[jnp.ndarray] = None):
  """Samples x_0 [B, H, W, C] from x_T (standard normal noise of the same shape).

  sampler: a name in NAMES ('ddim', 'plms', 'ddpm', 'dpmpp_2m', 'euler_ancestral' or its alias
    'euler_a'); steps: 1..T.
  eta: DDIM only (0 deterministic). grid: 'uniform' | 'quad' | 'trailing' (ddim, plms).
  clip_x0: ddpm only, clamps the x0 prediction to [-1, 1] like the original `clip_denoised`.
  x0 [B, H, W, C]: the clean latent for img2img and inpainting.
  strength in (0, 1]: img2img; runs min(int(steps * strength), steps) steps from x0 noised (with
    x_T) to the first of them. 1.0 (or None) starts from pure noise at the top of the grid.
  mask [B, H, W, 1|C] (1 = keep x0): inpainting; works with every sampler and with strength.
  return_trajectory: also return the state after each loop iteration [N, B, H, W, C] (the sampler's
    own state: sigma space for euler_ancestral; PLMS has N = S + 1 for S > 1).
  step_noise [N, B, H, W, C]: replaces the per-iteration noise drawn from rng (to reproduce another
    implementation's noise exactly); rng still drives the inpainting noise.
  """
  sampler = resolve(sampler)
  check_parameterization(parameterization)
  T = schedule.num_timesteps
  if not isinstance(steps, int) or not 1 <= steps <= T:
    raise ValueError(f'steps={steps!r}: expected an int with 1 <= steps <= num_timesteps={T}')
  if eta != 0.0 and sampler != 'ddim':
    raise ValueError(f'eta={eta!r} with sampler={sampler!r}: eta is a DDIM setting, expected 0.0')
  if eta < 0:
    raise ValueError(f'eta={eta!r}: expected eta >= 0')
  if grid not in base.GRIDS:
    raise ValueError(f'grid={grid!r}: expected one of {base.GRIDS}')
  if grid != 'uniform' and sampler not in ('ddim', 'plms'):
    raise ValueError(f'grid={grid!r} with sampler={sampler!r}: only ddim and plms take a grid; '
                     f"expected 'uniform'")
  if clip_x0 and sampler != 'ddpm':
    raise ValueError(f'clip_x0=True with sampler={sampler!r}: expected sampler ddpm')
  if (parameterization == 'eps' and sampler in ('ddim', 'plms', 'ddpm')
      and not isinstance(schedule.alphas_cumprod, jax.core.Tracer)):
    # At alphas_cumprod == 0 (zero terminal SNR) x0 = (x - eps) / 0: an eps model says nothing
    # about x0 there. (dpmpp_2m and euler_ancestral step from 2^-24 instead, like diffusers.)
    with jax.ensure_compile_time_eval():  # A host-side check, also when `sample` is traced.
      terminal = float(jnp.min(schedule.alphas_cumprod[sampler_timesteps(sampler, T, steps,
                                                                         grid)]))
    if terminal == 0.0:
      raise ValueError(f"parameterization='eps' with sampler={sampler!r}, grid={grid!r}: the grid "
                       f'reaches a timestep with alphas_cumprod == 0 (zero terminal SNR); '
                       f"expected a 'v' or 'x0' model there")
  if x_T.ndim != 4:
    raise ValueError(f'x_T shape {x_T.shape}: expected [B, H, W, C]')
  if (mask is not None or (strength is not None and strength < 1.0)) and x0 is None:
    raise ValueError('x0=None: inpainting (mask) and img2img (strength < 1) need the clean '
                     'latent x0')
  if x0 is not None and x0.shape != x_T.shape:
    raise ValueError(f'x0 shape {x0.shape}: expected the shape of x_T {x_T.shape}')
  if mask is not None:
    try:
      jnp.broadcast_shapes(mask.shape, x_T.shape)
    except ValueError:
      raise ValueError(f'mask shape {mask.shape}: expected to broadcast to x_T '
                       f'{x_T.shape}') from None
  if strength is not None:
    base.img2img_skip(steps, float(strength))  # validates before tracing
    strength = float(strength)
  return _sample_jit(schedule, x_T, cond, rng, x0, mask, step_noise, denoise=denoise,
                     sampler=sampler, steps=steps, eta=float(eta),
                     parameterization=parameterization, strength=strength, grid=grid,
                     clip_x0=bool(clip_x0), progress=bool(progress),
                     return_trajectory=bool(return_trajectory))


def sampler_timesteps(sampler: str, num_timesteps: int, steps: int, grid: str = 'uniform'):
  """The descending timesteps at which `sampler` calls the network (one per outer step)."""
  sampler = resolve(sampler)
  if sampler in ('ddim', 'plms'):
    return base.ddim_timesteps(num_timesteps, steps, grid)[::-1]
  if sampler == 'ddpm':
    return base.leading_timesteps(num_timesteps, steps)[::-1]
  if sampler == 'dpmpp_2m':
    return samplers_dpm.dpmpp_2m_timesteps(num_timesteps, steps)
  if sampler == 'euler_ancestral':
    return samplers_dpm.euler_timesteps(num_timesteps, steps)
  raise NotImplementedError(f'sampler={sampler!r} is registered in SAMPLERS but has no timesteps '
                            f'here; add it to sampler_timesteps')
