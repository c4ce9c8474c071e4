"""Samplers written in the sigma / log-SNR view of the chain: DPM-Solver++(2M) and Euler ancestral.

With a = alphas_cumprod[t] and sigma = sqrt((1 - a) / a), the VP pair is
alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha_t, and lambda = log(alpha_t / sigma_t) is
half the log-SNR.

  dpmpp_2m: diffusers `DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2)`
    with its defaults: 'linspace' spacing (linspace(0, T-1, S+1).round()[::-1][:-1]), final sigma 0,
    first and last steps first order. The state is the VP latent x_t; the solver works on x0
    predictions, so eps / x0 / v models all go through the same update.
  euler_ancestral: diffusers `EulerAncestralDiscreteScheduler` ('linspace' float timesteps, sigmas
    interpolated linearly in t). The state is the variance-exploding x = x_t / sqrt(a); the network
    sees x / sqrt(1 + sigma^2) and a float timestep. Pure noise starts at x_T * sigma_max like
    diffusers' init_noise_sigma.
"""

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import samplers_base as base
from ldm_jax.diffusion.objectives import x0_eps_from_output


def dpmpp_2m_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """Descending int timesteps of DPM-Solver++ with 'linspace' spacing."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f'steps={steps!r}: expected 1 <= steps <= num_timesteps={num_timesteps}')
  return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def euler_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """Descending float32 timesteps of the Euler samplers with 'linspace' spacing."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f'steps={steps!r}: expected 1 <= steps <= num_timesteps={num_timesteps}')
  return np.linspace(0, num_timesteps - 1, steps, dtype=np.float32)[::-1].copy()


def _sigmas_all(schedule) -> jnp.ndarray:
  # A zero-terminal-SNR schedule has alphas_cumprod[-1] = 0, an infinite sigma: like diffusers, use
  # 2^-24 there instead (sigma ~ 4096), which these solvers can step from.
  ac = jnp.maximum(schedule.alphas_cumprod, 2.0 ** -24)
  return jnp.sqrt((1.0 - ac) / ac)  # [T]


def _x0_from_output(out, x, alpha, sigma, parameterization):
  """x0 from the model output with the solver's own (alpha_t, sigma_t), as diffusers converts."""
  if parameterization == 'eps':
    return (x - sigma * out) / alpha
  if parameterization == 'v':
    return alpha * x - sigma * out
  return out


def dpmpp_2m(denoise, schedule, x_T, cond, rng, *, steps, parameterization, skip, pure_noise,
             x0, mask, step_noise, progress, return_trajectory, **unused):
  """DPM-Solver++(2M). Returns (x, trajectory [S, ...])."""
  del unused
  desc_ts = dpmpp_2m_timesteps(schedule.num_timesteps, steps)[skip:]  # [S']
  n = len(desc_ts)
  sig = jnp.concatenate([_sigmas_all(schedule)[desc_ts], jnp.zeros((1,), jnp.float32)])  # [S'+1]
  alpha = 1.0 / jnp.sqrt(sig ** 2 + 1.0)
  sigma_t = sig * alpha
  lam = jnp.log(alpha) - jnp.log(sigma_t)  # [S'+1]; +inf at the final sigma 0
  h = lam[1:] - lam[:-1]  # [S']
  # x_next = (sigma_next / sigma_now) x - alpha_next (exp(-h) - 1) (m + w1 (m - m_prev)).
  c_x = sigma_t[1:] / sigma_t[:-1]
  c_m = -alpha[1:] * (jnp.exp(-h) - 1.0)
  h_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), h[:-1]])  # h_0 = lambda_s0 - lambda_s1
  second = np.zeros(n, bool)
  second[1:n - 1] = True  # first step and the step to sigma 0 are first order
  w1 = jnp.where(jnp.asarray(second), 0.5 * h / h_prev, 0.0)  # 0.5 / r0, r0 = h_prev / h
  xs = dict(t=jnp.asarray(desc_ts, jnp.int32), alpha=alpha[:-1], sigma=sigma_t[:-1], c_x=c_x,
            c_m=c_m, w1=w1,
            c0=alpha[:-1], cn=sigma_t[:-1], mask_on=jnp.ones(n, bool))
  batch = x_T.shape[0]

  def body(carry, inp, noise):
    del noise
    x, m_prev = carry
    out = denoise(x, base.full_t(inp['t'], batch), cond)
    m = _x0_from_output(out.astype(jnp.float32), x, inp['alpha'], inp['sigma'], parameterization)
    x_new = inp['c_x'] * x + inp['c_m'] * (m + inp['w1'] * (m - m_prev))
    return (x_new, m), x_new

  x = base.start_latent(x_T, x0, pure_noise, 1.0, alpha[0], sigma_t[0])
  (x, _), traj = base.run_scan(body, (x, jnp.zeros_like(x)), xs, rng=rng, x0=x0, mask=mask,
                               step_noise=step_noise, needs_noise=False, progress=progress,
                               return_trajectory=return_trajectory, desc='dpmpp_2m')
  return x, traj


def euler_ancestral(denoise, schedule, x_T, cond, rng, *, steps, parameterization, skip,
                    pure_noise, x0, mask, step_noise, progress, return_trajectory, **unused):
  """Euler ancestral (eta 1). Returns (x, trajectory [S, ...]) in sigma space (x_t / sqrt(a))."""
  del unused
  T = schedule.num_timesteps
  desc_ts = euler_timesteps(T, steps)[skip:]  # [S'] float32
  n = len(desc_ts)
  sig = jnp.interp(jnp.asarray(desc_ts), jnp.arange(T, dtype=jnp.float32), _sigmas_all(schedule))
  sig = jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])  # [S'+1]
  s_from, s_to = sig[:-1], sig[1:]
  s_up = jnp.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
  s_down = jnp.sqrt(s_to ** 2 - s_up ** 2)
  xs = dict(t=jnp.asarray(desc_ts, jnp.float32), sigma=s_from, s_up=s_up, s_down=s_down,
            c0=jnp.ones((n,), jnp.float32), cn=s_from, mask_on=jnp.ones(n, bool))
  batch = x_T.shape[0]

  def body(carry, inp, noise):
    (x,) = carry
    s = inp['sigma']
    scale = jnp.sqrt(s ** 2 + 1.0)
    x_vp = x / scale
    out = denoise(x_vp, base.full_t(inp['t'], batch, jnp.float32), cond).astype(jnp.float32)
    if parameterization == 'eps':
      pred_x0 = x - s * out
    elif parameterization == 'v':
      pred_x0 = out * (-s / scale) + x / (s ** 2 + 1.0)
    else:
      pred_x0, _ = x0_eps_from_output(out, x_vp, 1.0 / (s ** 2 + 1.0), parameterization)
    derivative = (x - pred_x0) / s
    x = x + derivative * (inp['s_down'] - s) + noise * inp['s_up']
    return (x,), x

  x = base.start_latent(x_T, x0, pure_noise, sig[0], 1.0, sig[0])
  (x,), traj = base.run_scan(body, (x,), xs, rng=rng, x0=x0, mask=mask, step_noise=step_noise,
                             needs_noise=True, progress=progress,
                             return_trajectory=return_trajectory, desc='euler_ancestral')
  return x, traj
