"""Forward process, eps/x0/v conversions, and the training loss of `LatentDiffusion.p_losses`.

Conventions (Ho et al. 2020; Salimans & Ho 2022 for v), with a = alphas_cumprod[t]:
  x_t = sqrt(a) x0 + sqrt(1 - a) eps
  v   = sqrt(a) eps - sqrt(1 - a) x0
Everything here runs in fp32 whatever the dtype of the model output.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import Schedule

PARAMETERIZATIONS = ('eps', 'x0', 'v')
LOSS_TYPES = ('l1', 'l2')

Denoise = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


def check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f'parameterization={parameterization!r}: expected one of {PARAMETERIZATIONS}')


def _bcast(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """[B] -> [B, 1, ..., 1] so per-example coefficients broadcast over [B, H, W, C]."""
  values = jnp.asarray(values, jnp.float32)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def extract(arr: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """arr[t] for integer timesteps t [B], shaped [B, 1, 1, 1] for an ndim-4 batch."""
  return _bcast(arr[jnp.asarray(t, jnp.int32)], ndim)


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray,
             noise: jnp.ndarray) -> jnp.ndarray:
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise.  x0, noise: [B, H, W, C]; t: [B] int."""
  x0 = x0.astype(jnp.float32)
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


# -- conversions at given alphas_cumprod (a: scalar or broadcastable array) --------------------

def x0_eps_from_output(output: jnp.ndarray, x_t: jnp.ndarray, a: jnp.ndarray,
                       parameterization: str):
  """Splits a model output into (x0, eps) for the current x_t and alphas_cumprod a."""
  output = output.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
  if parameterization == 'eps':
    return (x_t - s1a * output) / sa, output
  if parameterization == 'x0':
    return output, (x_t - sa * output) / s1a
  if parameterization == 'v':
    return sa * x_t - s1a * output, sa * output + s1a * x_t
  raise ValueError(f'parameterization={parameterization!r}: expected one of {PARAMETERIZATIONS}')


def output_from_x0_eps(x0: jnp.ndarray, eps: jnp.ndarray, a: jnp.ndarray,
                       parameterization: str) -> jnp.ndarray:
  """The model target for a given (x0, eps) pair: eps, x0 or v."""
  if parameterization == 'eps':
    return eps
  if parameterization == 'x0':
    return x0
  if parameterization == 'v':
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
  raise ValueError(f'parameterization={parameterization!r}: expected one of {PARAMETERIZATIONS}')


# -- the same conversions at integer timesteps t [B] -------------------------------------------

def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def v_target(schedule: Schedule, x0, t, eps):
  """v = sqrt(a) eps - sqrt(1 - a) x0 (`DDPM.get_v`)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: Schedule, x_t, t, v):
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(schedule: Schedule, x_t, t, v):
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)


# -- loss weights -------------------------------------------------------------------------------

def lvlb_weights(schedule: Schedule, parameterization: str) -> jnp.ndarray:
  """Per-timestep weights [T] of the VLB term, exactly as `DDPM.register_schedule` sets them.

  The 'x0' formula keeps the original's `2. * 1 - a` (i.e. 2 - a) on purpose: it is what the
  published models were trained with. Entry 0 is copied from entry 1 (the posterior variance is 0
  at t=0).
  """
  check_parameterization(parameterization)
  if parameterization == 'eps':
    w = schedule.betas ** 2 / (2.0 * schedule.posterior_variance * schedule.alphas
                               * (1.0 - schedule.alphas_cumprod))
  elif parameterization == 'x0':
    w = 0.5 * jnp.sqrt(schedule.alphas_cumprod) / (2.0 * 1 - schedule.alphas_cumprod)
  else:
    w = jnp.ones_like(schedule.betas)
  return w.at[0].set(w[1])


def min_snr_weights(schedule: Schedule, t: jnp.ndarray, gamma: float,
                    parameterization: str) -> jnp.ndarray:
  """Min-SNR-gamma weights [B] (Hang et al. 2023) for the loss in each parameterisation's space.

  With SNR = a / (1 - a) the x0-space weight is min(SNR, gamma); dividing by the factor that relates
  the target's error to the x0 error gives min(SNR, gamma) / SNR for eps and / (SNR + 1) for v.
  """
  snr = schedule.snr()[t]  # [B]
  clipped = jnp.minimum(snr, gamma)
  if parameterization == 'eps':
    return clipped / snr
  if parameterization == 'v':
    return clipped / (snr + 1.0)
  return clipped


def diffusion_loss(denoise: Denoise, x0: jnp.ndarray, cond: Any, rng: jax.Array,
                   schedule: Schedule, *, parameterization: str = 'eps', loss_type: str = 'l2',
                   logvar: Optional[jnp.ndarray] = None, l_simple_weight: float = 1.0,
                   original_elbo_weight: float = 0.0, min_snr_gamma: Optional[float] = None,
                   t: Optional[jnp.ndarray] = None, noise: Optional[jnp.ndarray] = None):
  """`LatentDiffusion.p_losses`: returns (loss scalar, metrics dict), all fp32.

  x0: [B, H, W, C] clean latents; cond: whatever `denoise(x_t, t, cond)` takes. t [B] and noise
  default to uniform timesteps and standard normal noise drawn from rng; pass them to fix them.
  logvar: optional learned per-timestep log-variance [T] (the original's `model.logvar`); without it
  the log-variance is 0 and loss_gamma equals loss_simple. min_snr_gamma reweights the per-example
  simple loss (it does not touch the VLB term).
  """
  check_parameterization(parameterization)
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type={loss_type!r}: expected one of {LOSS_TYPES}')
  batch = x0.shape[0]
  x0 = x0.astype(jnp.float32)
  t_rng, n_rng = jax.random.split(rng)
  if t is None:
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps)  # [B]
  if noise is None:
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)  # [B, H, W, C]
  x_t = q_sample(schedule, x0, t, noise)  # [B, H, W, C]
  output = denoise(x_t, t, cond).astype(jnp.float32)
  target = output_from_x0_eps(x0, noise, extract(schedule.alphas_cumprod, t, x0.ndim),
                              parameterization)
  err = output - target
  pointwise = jnp.abs(err) if loss_type == 'l1' else err ** 2
  per_example = jnp.mean(pointwise, axis=tuple(range(1, x0.ndim)))  # [B]

  metrics = {}
  loss_simple = per_example
  if min_snr_gamma is not None:
    weights = min_snr_weights(schedule, t, min_snr_gamma, parameterization)  # [B]
    loss_simple = loss_simple * weights
    metrics['min_snr_weight'] = jnp.mean(weights)
  metrics['loss_simple'] = jnp.mean(loss_simple)

  logvar_t = (jnp.zeros((batch,), jnp.float32) if logvar is None
              else jnp.asarray(logvar, jnp.float32)[t])  # [B]
  loss_gamma = loss_simple / jnp.exp(logvar_t) + logvar_t  # [B]
  if logvar is not None:
    metrics['loss_gamma'] = jnp.mean(loss_gamma)
    metrics['logvar'] = jnp.mean(jnp.asarray(logvar, jnp.float32))
  loss = l_simple_weight * jnp.mean(loss_gamma)

  loss_vlb = jnp.mean(lvlb_weights(schedule, parameterization)[t] * per_example)
  metrics['loss_vlb'] = loss_vlb
  loss = loss + original_elbo_weight * loss_vlb
  metrics['loss'] = loss
  return loss, metrics
