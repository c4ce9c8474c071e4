"""Sampler behaviour: edge step counts, exact-prediction closed forms, parameterisation consistency,
img2img start (against diffusers), inpainting, and compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ldm_jax.diffusion.samplers import SAMPLERS, sample, sampler_timesteps
from ldm_jax.diffusion.samplers_base import img2img_skip
from ldm_jax.diffusion.schedules import Schedule

SHAPE = (2, 4, 4, 3)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')


@pytest.fixture(scope='module')
def schedule():
  return Schedule.create('linear', 1000, 0.00085, 0.012)


def arrays(seed=0):
  r = np.random.default_rng(seed)
  x0 = 0.8 * np.tanh(r.standard_normal(SHAPE)).astype(np.float32)
  x_T = r.standard_normal(SHAPE).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(x_T)


def alpha_bar_at(schedule, t):
  """alphas_cumprod at (possibly float) t [B] the way the samplers see it (sigma interpolation)."""
  ac = schedule.alphas_cumprod
  sig = jnp.interp(t.astype(jnp.float32), jnp.arange(ac.shape[0], dtype=jnp.float32),
                   jnp.sqrt((1 - ac) / ac))
  return (1.0 / (1.0 + sig ** 2)).reshape(-1, 1, 1, 1)


def exact_denoiser(schedule, x0, parameterization):
  """The network that knows x0: returns the exact eps / x0 / v for the x_t it is given."""
  def denoise(x, t, cond):
    del cond
    a = alpha_bar_at(schedule, t)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return {'eps': eps, 'x0': x0 + 0 * x, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[
        parameterization]
  return denoise


@pytest.mark.parametrize('sampler', list(SAMPLERS))
def test_exact_prediction_closed_form(schedule, sampler):
  """With the exact x0 known, every parameterisation lands on the closed-form end point.

  dpmpp_2m, euler_ancestral and ddpm end at sigma 0: the result is x0. ddim and plms end at
  alphas_cumprod[0] (CompVis): the chain stays on sqrt(a) x0 + sqrt(1 - a) e with the e of the start.
  """
  x0, x_T = arrays()
  a0 = schedule.alphas_cumprod[0]
  t_top = sampler_timesteps(sampler, 1000, 8)[0]
  a_top = float(alpha_bar_at(schedule, jnp.asarray([t_top]))[0, 0, 0, 0])
  e = (x_T - np.sqrt(a_top) * x0) / np.sqrt(1 - a_top)
  expected = x0 if sampler in ('dpmpp_2m', 'euler_ancestral', 'ddpm') else (
      jnp.sqrt(a0) * x0 + jnp.sqrt(1 - a0) * e)
  for param in ('eps', 'x0', 'v'):
    start = x_T
    if sampler == 'euler_ancestral':  # it starts at x_T * sigma_max, i.e. a VP latent of x_T * ~1
      start = x_T / np.sqrt(1 - a_top) / np.sqrt(1 / a_top) * np.sqrt(1 / a_top - 1)
    out = sample(exact_denoiser(schedule, x0, param), schedule, start, None, jax.random.key(1),
                 sampler=sampler, steps=8, parameterization=param)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4,
                               err_msg=f'{sampler} {param}')


def stand_in(x, t, cond):
  del cond
  t = t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
  return 0.8 * x * jnp.sqrt(t) + 0.2 * jnp.tanh(0.5 * x + t) + 0.05 * jnp.mean(x, (1, 2),
                                                                              keepdims=True)


def as_param(schedule, parameterization):
  """The stand-in eps network re-expressed as an x0 or v network (same x0 and eps predictions)."""
  def denoise(x, t, cond):
    eps = stand_in(x, t, cond)
    a = alpha_bar_at(schedule, t)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return x0 if parameterization == 'x0' else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
  return denoise


@pytest.mark.parametrize('sampler', ['plms', 'ddim', 'dpmpp_2m'])
def test_parameterisations_agree(schedule, sampler):
  _, x_T = arrays(3)
  ref = sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler=sampler, steps=6)
  for param in ('x0', 'v'):
    out = sample(as_param(schedule, param), schedule, x_T, None, jax.random.key(0),
                 sampler=sampler, steps=6, parameterization=param)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, err_msg=param)


def test_ddim_step_counts(schedule):
  _, x_T = arrays()
  np.testing.assert_array_equal(sampler_timesteps('ddim', 1000, 50)[::-1][:3], [1, 21, 41])
  np.testing.assert_array_equal(sampler_timesteps('ddim', 1000, 1000), np.arange(1000)[::-1])
  assert sampler_timesteps('ddim', 1000, 1000 - 1)[0] == 999
  out1 = sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='ddim', steps=1)
  # One step from t=1 down to alphas_cumprod[0]: a closed form.
  a, a0 = schedule.alphas_cumprod[1], schedule.alphas_cumprod[0]
  eps = stand_in(x_T, jnp.ones((2,), jnp.int32), None)
  np.testing.assert_allclose(np.asarray(out1), np.asarray(
      jnp.sqrt(a0) * (x_T - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a) + jnp.sqrt(1 - a0) * eps),
      atol=1e-5)
  out_full, traj = sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='ddim',
                          steps=1000, eta=1.0, return_trajectory=True)
  assert traj.shape == (1000,) + SHAPE and bool(jnp.all(jnp.isfinite(out_full)))
  x0, _ = arrays()
  out = sample(exact_denoiser(schedule, x0, 'v'), schedule, x_T, None, jax.random.key(0),
               sampler='ddim', steps=1000)
  a_top = schedule.alphas_cumprod[999]
  e = (x_T - jnp.sqrt(a_top) * x0) / jnp.sqrt(1 - a_top)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.sqrt(a0) * x0 + jnp.sqrt(1 - a0) * e),
                             atol=2e-4)


def test_compiles_once(schedule):
  traces = []

  def counting(x, t, cond):
    traces.append(1)  # runs only while tracing
    return stand_in(x, t, None) * cond['scale']

  x0, x_T = arrays()
  kw = dict(sampler='plms', steps=5)
  a = sample(counting, schedule, x_T, {'scale': jnp.float32(1.0)}, jax.random.key(0), **kw)
  n = len(traces)
  assert n >= 1
  b = sample(counting, schedule, x0, {'scale': jnp.float32(0.5)}, jax.random.key(7), **kw)
  assert len(traces) == n, 'second call with new x_T / cond / rng retraced'
  assert not np.allclose(np.asarray(a), np.asarray(b))
  sample(counting, schedule, x0, {'scale': jnp.float32(0.5)}, jax.random.key(7), sampler='plms',
         steps=6)
  assert len(traces) > n  # a new step count is a new loop


def diffusers_img2img(sched, x0, noise, steps, strength, begin_index=False):
  """The diffusers img2img pipeline's start (get_timesteps + add_noise), then the plain loop."""
  sched.set_timesteps(steps)
  init = min(int(steps * strength), steps)
  t_start = max(steps - init, 0)
  ts = sched.timesteps[t_start * sched.order:]
  if begin_index:
    sched.set_begin_index(t_start * sched.order)
  x = sched.add_noise(torch.from_numpy(np.asarray(x0)), torch.from_numpy(np.asarray(noise)),
                      ts[:1].repeat(SHAPE[0]))
  traj = []
  for t in ts:
    out = stand_in(jnp.asarray(x.numpy()), jnp.full((SHAPE[0],), int(t)), None)
    x = sched.step(torch.from_numpy(np.asarray(out)), t, x).prev_sample
    traj.append(x.numpy())
  return np.stack(traj), [int(t) for t in ts]


@pytest.mark.parametrize('sampler,steps,strength', [('ddim', 10, 0.55), ('ddim', 7, 0.3),
                                                    ('dpmpp_2m', 10, 0.75)])
def test_img2img_matches_diffusers(schedule, sampler, steps, strength):
  x0, noise = arrays(5)
  if sampler == 'ddim':
    sched = DDIMScheduler(**SD, timestep_spacing='leading', steps_offset=1, set_alpha_to_one=False,
                          clip_sample=False)
  else:
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type='dpmsolver++', solver_order=2)
  sched.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
  if hasattr(sched, 'final_alpha_cumprod'):
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
  ref, ref_ts = diffusers_img2img(sched, x0, noise, steps, strength, sampler == 'dpmpp_2m')
  skip = img2img_skip(steps, strength)
  assert list(sampler_timesteps(sampler, 1000, steps)[skip:]) == ref_ts
  _, traj = sample(stand_in, schedule, noise, None, jax.random.key(0), sampler=sampler,
                   steps=steps, x0=x0, strength=strength, return_trajectory=True)
  np.testing.assert_allclose(np.asarray(traj), ref, atol=1e-5)


def test_strength_one_is_pure_noise(schedule):
  x0, x_T = arrays()
  for sampler in ('ddim', 'euler_ancestral'):
    plain = sample(stand_in, schedule, x_T, None, jax.random.key(2), sampler=sampler, steps=5)
    full = sample(stand_in, schedule, x_T, None, jax.random.key(2), sampler=sampler, steps=5,
                  x0=x0, strength=1.0)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(plain))
  with pytest.raises(ValueError, match='strength=0.05 with steps=10'):
    sample(stand_in, schedule, x_T, None, jax.random.key(2), steps=10, x0=x0, strength=0.05)
  with pytest.raises(ValueError, match='x0=None'):
    sample(stand_in, schedule, x_T, None, jax.random.key(2), steps=10, strength=0.5)


@pytest.mark.parametrize('sampler', list(SAMPLERS))
def test_inpainting(schedule, sampler):
  x0, x_T = arrays(1)
  x0_other = x0.at[:, :2].set(-x0[:, :2])
  rng = jax.random.key(4)
  full = sample(stand_in, schedule, x_T, None, rng, sampler=sampler, steps=4, x0=x0,
                mask=jnp.ones(SHAPE[:3] + (1,)))
  np.testing.assert_allclose(np.asarray(full), np.asarray(x0), atol=1e-6)
  mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, :2].set(1.0)  # keep the top two rows
  a = sample(stand_in, schedule, x_T, None, rng, sampler=sampler, steps=4, x0=x0, mask=mask)
  b = sample(stand_in, schedule, x_T, None, rng, sampler=sampler, steps=4, x0=x0_other, mask=mask)
  np.testing.assert_array_equal(np.asarray(a[:, :2]), np.asarray(x0[:, :2]))
  np.testing.assert_array_equal(np.asarray(b[:, :2]), np.asarray(x0_other[:, :2]))
  assert bool(jnp.all(jnp.isfinite(a)))
  # The generated rows see the known rows during sampling (the stand-in mixes in the spatial mean),
  # so a different known region must change them: the masking acts at every step, not only at the end.
  assert float(jnp.abs(a[:, 2:] - b[:, 2:]).max()) > 1e-3
