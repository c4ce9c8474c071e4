"""Shared machinery of the samplers: timestep grids, the img2img start, and the one scan loop.

Each sampler describes its steps as per-iteration arrays (`xs`, scanned over) and a body
`body(carry, xs_i, noise_i) -> (carry, x_new)` whose carry starts with the current latent x.
`run_scan` wraps the body with what every sampler shares: per-step noise (from the rng, or injected
for tests), inpainting by latent masking before each step, an optional host progress bar, and the
optional trajectory. Grids are numpy (they depend only on the static step count and T); everything
that depends on the schedule's values is jnp, so a new schedule is just a new argument, not a
recompile.
"""

import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

GRIDS = ('uniform', 'quad', 'trailing')


# -- timestep grids (ascending numpy int arrays unless stated) ----------------------------------

def ddim_timesteps(num_timesteps: int, steps: int, grid: str = 'uniform') -> np.ndarray:
  """The CompVis DDIM grid `make_ddim_timesteps(...) + 1`, ascending, exactly `steps` entries.

  'uniform': arange(steps) * (T // steps) + 1 (T=1000, S=50 -> 1, 21, ..., 981), which is CompVis'
  `range(0, T, T // S)` when S divides T and diffusers' 'leading' spacing with steps_offset=1 in
  general. The original indexes alphas_cumprod[T] for S = T; here the +1 shift is dropped when it
  would leave the table, so S = T gives 0..T-1.
  'quad': (linspace(0, sqrt(0.8 T), S)^2).astype(int) + 1.
  'trailing': diffusers' round(arange(T, 0, -T / S)) - 1, which starts at T - 1 (Lin et al. 2023:
  with a zero-terminal-SNR schedule the first step then really starts from pure noise).
  """
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f'steps={steps!r}: expected 1 <= steps <= num_timesteps={num_timesteps}')
  if grid == 'uniform':
    ts = np.arange(steps, dtype=np.int64) * (num_timesteps // steps)
  elif grid == 'quad':
    ts = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
  elif grid == 'trailing':
    # diffusers' float arange can yield S + 1 entries (e.g. S = 61, ending at -1): count k instead.
    k = np.arange(steps, dtype=np.float64)
    ts = np.round(num_timesteps - k * num_timesteps / steps).astype(np.int64) - 1
    return np.sort(ts)
  else:
    raise ValueError(f'grid={grid!r}: expected one of {GRIDS}')
  shift = 1 if ts[-1] + 1 <= num_timesteps - 1 else 0
  return ts + shift


def leading_timesteps(num_timesteps: int, steps: int, offset: int = 0) -> np.ndarray:
  """diffusers 'leading' spacing, ascending: arange(steps) * (T // steps) + offset."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f'steps={steps!r}: expected 1 <= steps <= num_timesteps={num_timesteps}')
  return np.arange(steps, dtype=np.int64) * (num_timesteps // steps) + offset


def img2img_skip(steps: int, strength: Optional[float]) -> int:
  """How many of the `steps` descending grid entries img2img skips, as diffusers computes it.

  init = min(int(steps * strength), steps) steps are run, starting at descending index steps - init,
  and the input is noised to that step's timestep (CompVis noises one grid step higher than it
  starts, an off-by-one we do not copy). strength None or 1.0 runs every step.
  """
  if strength is None:
    return 0
  if not 0.0 < strength <= 1.0:
    raise ValueError(f'strength={strength!r}: expected 0 < strength <= 1')
  run = min(int(steps * strength), steps)
  if run < 1:
    raise ValueError(f'strength={strength!r} with steps={steps} runs no step: '
                     f'expected strength >= 1/steps = {1.0 / steps:.4g}')
  return steps - run


# -- host progress bar ----------------------------------------------------------------------------

_BARS: Dict[int, Any] = {}


def _tick(i, *, total: int, desc: str) -> None:
  """Host side of the progress bar: opens at iteration 0, closes at the last one."""
  from tqdm.auto import tqdm  # Imported lazily: only runs when progress=True.
  i = int(i)
  bar = _BARS.get(total)
  if i == 0 or bar is None:
    if bar is not None:
      bar.close()
    bar = _BARS[total] = tqdm(total=total, desc=desc, leave=False)
  bar.update(1)
  if i == total - 1:
    bar.close()
    _BARS.pop(total, None)


# -- the loop -------------------------------------------------------------------------------------

def full_t(t: jnp.ndarray, batch: int, dtype=jnp.int32) -> jnp.ndarray:
  """A scalar timestep broadcast to the [B] vector that denoise expects."""
  return jnp.full((batch,), t, dtype)


def run_scan(body: Callable, carry: tuple, xs: Dict[str, jnp.ndarray], *, rng: jax.Array,
             x0: Optional[jnp.ndarray], mask: Optional[jnp.ndarray],
             step_noise: Optional[jnp.ndarray], needs_noise: bool, progress: bool,
             return_trajectory: bool, desc: str):
  """Runs `body` once per entry of xs in a lax.scan; returns (carry, trajectory or None).

  xs must hold 'c0', 'cn' (the known region at this step is c0 * x0 + cn * noise) and 'mask_on'
  (whether this iteration starts an outer step, where inpainting re-imposes the known region).
  When mask is given (1 = keep x0), before each outer step x = known * mask + (1 - mask) * x, with
  fresh noise each step as in CompVis `q_sample(x0, ts)`.
  """
  total = int(next(iter(xs.values())).shape[0])
  xs = dict(xs, i=jnp.arange(total, dtype=jnp.int32))
  if step_noise is not None:
    if step_noise.shape[0] != total or step_noise.shape[1:] != carry[0].shape:
      raise ValueError(f'step_noise shape {step_noise.shape}: expected '
                       f'{(total,) + tuple(carry[0].shape)} (one noise per scan iteration)')
    xs['noise'] = step_noise.astype(jnp.float32)

  draw_step_noise = needs_noise and step_noise is None

  def wrapped(carry, inp):
    if mask is not None or draw_step_noise:
      # Keys are derived only when used: threefry is costly to compile on CPU.
      step_key, mask_key = jax.random.split(jax.random.fold_in(rng, inp['i']))
    x = carry[0]
    if mask is not None:
      n = jax.random.normal(mask_key, x.shape, jnp.float32)  # [B, H, W, C]
      known = inp['c0'] * x0 + inp['cn'] * n
      x = jnp.where(inp['mask_on'], mask * known + (1.0 - mask) * x, x)
    noise = None
    if step_noise is not None:
      noise = inp['noise']
    elif draw_step_noise:
      noise = jax.random.normal(step_key, x.shape, jnp.float32)
    carry, x_new = body((x,) + tuple(carry[1:]), inp, noise)
    if progress:
      jax.debug.callback(functools.partial(_tick, total=total, desc=desc), inp['i'])
    return carry, (x_new if return_trajectory else None)

  return jax.lax.scan(wrapped, carry, xs)


def start_latent(x_T: jnp.ndarray, x0: Optional[jnp.ndarray], pure_noise: bool,
                 noise_scale, c0, cn) -> jnp.ndarray:
  """The first state: x_T * noise_scale from pure noise, else c0 * x0 + cn * x_T (img2img)."""
  if pure_noise:
    return x_T.astype(jnp.float32) * noise_scale
  return c0 * x0 + cn * x_T.astype(jnp.float32)
