"""Samplers on the discrete VP chain: DDIM (Song et al. 2021), PLMS (Liu et al. 2022) and DDPM.

Each is one `lax.scan` with exactly one `denoise` call per iteration, so the network is traced once.
All three take eps, x0 or v models: the output is split into (x0, eps) with the current x_t and
alphas_cumprod, and the update is written in those terms.

Reference behaviour:
  ddim: CompVis `DDIMSampler` (a_prev of the last step = alphas_cumprod[0]) == diffusers
        `DDIMScheduler` with timestep_spacing 'leading', steps_offset 1, set_alpha_to_one False.
  plms: CompVis `PLMSSampler` == diffusers `PNDMScheduler(skip_prk_steps=True)` for eps models.
        The first step needs two model calls; here it is two scan iterations, so the scan runs
        S + 1 times (S > 1).
        For v / x0 models each output is converted to eps with its own x_t and t before the
        Adams-Bashforth combination, as CompVis does (diffusers combines raw v's, which differs).
  ddpm: ancestral sampling as diffusers `DDPMScheduler` ('fixed_small' variance, 'leading' spacing,
        offset 0, a_prev = 1 after t = 0); steps = T is the original `p_sample_loop`.
"""

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import samplers_base as base
from ldm_jax.diffusion.objectives import x0_eps_from_output


def _a(schedule, t) -> jnp.ndarray:
  """alphas_cumprod at numpy timesteps; -1 means 'after the last step' = alphas_cumprod[0]."""
  t = np.asarray(t)
  return schedule.alphas_cumprod[np.maximum(t, 0)]


def _vp_known(a):
  """Inpainting / img2img coefficients on the VP chain: q_sample = sqrt(a) x0 + sqrt(1-a) n."""
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def ddim(denoise, schedule, x_T, cond, rng, *, steps, eta, parameterization, skip, pure_noise,
         x0, mask, step_noise, progress, return_trajectory, grid='uniform', **unused):
  """DDIM with eta (0 = deterministic, 1 = DDPM-like variance). Returns (x, trajectory [S, ...])."""
  del unused
  desc_ts = base.ddim_timesteps(schedule.num_timesteps, steps, grid)[::-1]  # [S]
  prev_ts = np.append(desc_ts[1:], -1)
  desc_ts, prev_ts = desc_ts[skip:], prev_ts[skip:]
  a, a_prev = _a(schedule, desc_ts), _a(schedule, prev_ts)  # [S'] each
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
  c0, cn = _vp_known(a)
  xs = dict(t=jnp.asarray(desc_ts, jnp.int32), a=a, a_prev=a_prev, sigma=sigma, c0=c0, cn=cn,
            mask_on=jnp.ones(len(desc_ts), bool))
  batch = x_T.shape[0]

  def body(carry, inp, noise):
    (x,) = carry
    out = denoise(x, base.full_t(inp['t'], batch), cond)
    pred_x0, eps = x0_eps_from_output(out, x, inp['a'], parameterization)
    direction = jnp.sqrt(1.0 - inp['a_prev'] - inp['sigma'] ** 2) * eps
    x = jnp.sqrt(inp['a_prev']) * pred_x0 + direction
    if noise is not None:
      x = x + inp['sigma'] * noise
    return (x,), x

  x = base.start_latent(x_T, x0, pure_noise, 1.0, c0[0], cn[0])
  (x,), traj = base.run_scan(body, (x,), xs, rng=rng, x0=x0, mask=mask, step_noise=step_noise,
                             needs_noise=eta > 0, progress=progress,
                             return_trajectory=return_trajectory, desc='ddim')
  return x, traj


# Adams-Bashforth weights on [eps_now, eps_-1, eps_-2, eps_-3] per iteration kind: iteration 0 is a
# provisional DDIM step, iteration 1 averages the two eps of the first step, then AB2, AB3, AB4.
_PLMS_WEIGHTS = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0],
    [3.0 / 2, -1.0 / 2, 0.0, 0.0],
    [23.0 / 12, -16.0 / 12, 5.0 / 12, 0.0],
    [55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24],
], np.float32)


def plms(denoise, schedule, x_T, cond, rng, *, steps, parameterization, skip, pure_noise, x0,
         mask, step_noise, progress, return_trajectory, grid='uniform', **unused):
  """PLMS. Trajectory: the state after each of the S + 1 iterations (the first is provisional)."""
  del unused
  desc_ts = base.ddim_timesteps(schedule.num_timesteps, steps, grid)[::-1][skip:]  # [S']
  n = len(desc_ts)
  nxt = np.append(desc_ts[1:], -1)  # the step k goes desc_ts[k] -> nxt[k]
  if n == 1:
    # A single step has no second point to average with: it is one DDIM step (as diffusers does).
    it_call, it_from, it_to, kind = desc_ts, desc_ts, nxt, np.array([0])
  else:
    # Iteration j: 0 -> call at t_0, step t_0->t_1; 1 -> call at t_1 on the provisional state,
    # redo t_0->t_1 from the saved state; j >= 2 -> call at t_{j-1}, step t_{j-1} -> t_j.
    outer = np.concatenate([[0], [0], np.arange(1, n)])  # [n + 1] outer step of each iteration
    it_from, it_to = desc_ts[outer], nxt[outer]
    it_call = np.concatenate([[desc_ts[0]], [nxt[0]], desc_ts[1:]])
    kind = np.concatenate([[0, 1], np.minimum(np.arange(2, n + 1), 4)])
  weights = jnp.asarray(_PLMS_WEIGHTS[kind])  # [iters, 4]
  a_call, a_from, a_to = _a(schedule, it_call), _a(schedule, it_from), _a(schedule, it_to)
  c0, cn = _vp_known(a_call)
  xs = dict(t=jnp.asarray(it_call, jnp.int32), a_call=a_call, a_from=a_from, a_to=a_to,
            w=weights, c0=c0, cn=cn, mask_on=jnp.asarray(kind != 1),
            use_saved=jnp.asarray(kind == 1), save=jnp.asarray(kind == 0),
            push=jnp.asarray(kind != 1))
  batch = x_T.shape[0]

  def body(carry, inp, noise):
    del noise
    x, x_saved, hist = carry  # hist [3, B, H, W, C]: previous eps, most recent first
    out = denoise(x, base.full_t(inp['t'], batch), cond)
    _, eps = x0_eps_from_output(out, x, inp['a_call'], parameterization)
    w = inp['w']
    eps_comb = w[0] * eps + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]
    x_from = jnp.where(inp['use_saved'], x_saved, x)
    pred_x0 = (x_from - jnp.sqrt(1.0 - inp['a_from']) * eps_comb) / jnp.sqrt(inp['a_from'])
    x_new = jnp.sqrt(inp['a_to']) * pred_x0 + jnp.sqrt(1.0 - inp['a_to']) * eps_comb
    x_saved = jnp.where(inp['save'], x, x_saved)
    hist = jnp.where(inp['push'], jnp.concatenate([eps[None], hist[:2]], axis=0), hist)
    return (x_new, x_saved, hist), x_new

  x = base.start_latent(x_T, x0, pure_noise, 1.0, c0[0], cn[0])
  carry = (x, x, jnp.zeros((3,) + x.shape, jnp.float32))
  (x, _, _), traj = base.run_scan(body, carry, xs, rng=rng, x0=x0, mask=mask,
                                  step_noise=step_noise, needs_noise=False, progress=progress,
                                  return_trajectory=return_trajectory, desc='plms')
  return x, traj


def ddpm(denoise, schedule, x_T, cond, rng, *, steps, parameterization, skip, pure_noise, x0,
         mask, step_noise, progress, return_trajectory, clip_x0=False, **unused):
  """Ancestral DDPM on the 'leading' grid of `steps` entries; clip_x0 clamps x0 to [-1, 1]."""
  del unused
  T = schedule.num_timesteps
  desc_ts = base.leading_timesteps(T, steps)[::-1]  # [S]
  prev_ts = desc_ts - T // steps
  desc_ts, prev_ts = desc_ts[skip:], prev_ts[skip:]
  a = _a(schedule, desc_ts)
  a_prev = jnp.where(jnp.asarray(prev_ts >= 0), _a(schedule, prev_ts), 1.0)
  alpha_step = a / a_prev
  beta_step = 1.0 - alpha_step
  coef_x0 = jnp.sqrt(a_prev) * beta_step / (1.0 - a)
  coef_x = jnp.sqrt(alpha_step) * (1.0 - a_prev) / (1.0 - a)
  var = jnp.maximum((1.0 - a_prev) / (1.0 - a) * beta_step, 1e-20)
  std = jnp.where(jnp.asarray(desc_ts > 0), jnp.sqrt(var), 0.0)  # no noise on the last step
  c0, cn = _vp_known(a)
  xs = dict(t=jnp.asarray(desc_ts, jnp.int32), a=a, coef_x0=coef_x0, coef_x=coef_x, std=std,
            c0=c0, cn=cn, mask_on=jnp.ones(len(desc_ts), bool))
  batch = x_T.shape[0]

  def body(carry, inp, noise):
    (x,) = carry
    out = denoise(x, base.full_t(inp['t'], batch), cond)
    pred_x0, _ = x0_eps_from_output(out, x, inp['a'], parameterization)
    if clip_x0:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    x = inp['coef_x0'] * pred_x0 + inp['coef_x'] * x + inp['std'] * noise
    return (x,), x

  x = base.start_latent(x_T, x0, pure_noise, 1.0, c0[0], cn[0])
  (x,), traj = base.run_scan(body, (x,), xs, rng=rng, x0=x0, mask=mask, step_noise=step_noise,
                             needs_noise=True, progress=progress,
                             return_trajectory=return_trajectory, desc='ddpm')
  return x, traj
