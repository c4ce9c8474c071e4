"""Sampler behaviour: edge step counts, exact-prediction closed forms, parameterisation consistency,
compile-once and the rng path. img2img and inpainting are in test_editing.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import samplers_base
from ldm_jax.diffusion.samplers import SAMPLERS, sample, sampler_timesteps
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
  alphas_cumprod[0] (CompVis): the chain stays on sqrt(a) x0 + sqrt(1 - a) e, e from the start.
  """
  x0, x_T = arrays()
  a0 = schedule.alphas_cumprod[0]
  t_top = sampler_timesteps(sampler, 1000, 8)[0]
  a_top = float(alpha_bar_at(schedule, jnp.asarray([t_top]))[0, 0, 0, 0])
  e = (x_T - np.sqrt(a_top) * x0) / np.sqrt(1 - a_top)
  expected = x0 if sampler in ('dpmpp_2m', 'euler_ancestral', 'ddpm') else (
      jnp.sqrt(a0) * x0 + jnp.sqrt(1 - a0) * e)
  # Injected noise keeps the PRNG out of these compiles (the rng path is tested below).
  noise = (jnp.asarray(np.random.default_rng(9).standard_normal((8,) + SHAPE), jnp.float32)
           if sampler in ('ddpm', 'euler_ancestral') else None)
  for param in ('eps', 'x0', 'v'):
    out = sample(exact_denoiser(schedule, x0, param), schedule, x_T, None, jax.random.key(1),
                 sampler=sampler, steps=8, parameterization=param, step_noise=noise)
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
  for steps in (1, 7, 61, 103, 1000):  # 'trailing': exactly S distinct steps from 999 down to >= 0
    ts = sampler_timesteps('ddim', 1000, steps, 'trailing')
    assert len(set(ts)) == steps and ts[0] == 999 and ts[-1] >= 0
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
               sampler='ddim', steps=1000, parameterization='v')
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


def test_rng_drives_the_noise(schedule):
  _, x_T = arrays()
  run = lambda key: np.asarray(sample(stand_in, schedule, x_T, None, key, sampler='ddpm', steps=5))
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.isfinite(a).all() and np.abs(a - c).max() > 1e-2


def test_quad_grid_and_progress(schedule, monkeypatch):
  # CompVis 'quad': (linspace(0, sqrt(0.8 T), S)^2).astype(int) + 1; S=5, T=1000 gives
  # 0, 50, 200, 450, 800 before the + 1.
  np.testing.assert_array_equal(sampler_timesteps('ddim', 1000, 5, 'quad')[::-1],
                                [1, 51, 201, 451, 801])
  ticks = []
  monkeypatch.setattr(samplers_base, '_tick', lambda i, total, desc: ticks.append((int(i), total)))
  _, x_T = arrays()
  out = sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='plms', steps=5,
               grid='quad', progress=True)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert sorted(ticks) == [(i, 6) for i in range(6)]  # PLMS: S + 1 iterations


def test_bad_settings_are_named(schedule):
  _, x_T = arrays()
  zsnr = Schedule.create('linear', 1000, 0.00085, 0.012, zero_terminal_snr=True)
  with pytest.raises(ValueError, match="parameterization='eps' with sampler='ddim'"):
    sample(stand_in, zsnr, x_T, None, jax.random.key(0), steps=10, grid='trailing')
  with pytest.raises(ValueError, match="grid='quad' with sampler='ddpm'"):
    sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='ddpm', grid='quad')
  with pytest.raises(ValueError, match="eta=0.5 with sampler='plms'"):
    sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='plms', eta=0.5)
  with pytest.raises(ValueError, match='steps=1001'):
    sample(stand_in, schedule, x_T, None, jax.random.key(0), steps=1001)
  with pytest.raises(ValueError, match="sampler='heun'"):
    sample(stand_in, schedule, x_T, None, jax.random.key(0), sampler='heun')


def test_the_registry_names_every_sampler_and_its_alias(schedule):
  """NAMES is every accepted name; an alias runs exactly the sampler it stands for."""
  assert set(samplers.NAMES) == set(SAMPLERS) | set(samplers.ALIASES)
  assert all(target in SAMPLERS for target in samplers.ALIASES.values())
  assert samplers.resolve('euler_a') == 'euler_ancestral' == samplers.resolve('euler_ancestral')
  with pytest.raises(ValueError, match=r"sampler='euler'.*'euler_a'"):
    samplers.resolve('euler')
  _, x_T = arrays()
  by_alias = sample(stand_in, schedule, x_T, None, jax.random.key(3), sampler='euler_a', steps=4)
  by_name = sample(stand_in, schedule, x_T, None, jax.random.key(3), sampler='euler_ancestral',
                   steps=4)
  np.testing.assert_array_equal(np.asarray(by_alias), np.asarray(by_name))
  np.testing.assert_array_equal(sampler_timesteps('euler_a', 1000, 4),
                                sampler_timesteps('euler_ancestral', 1000, 4))
  # Every registered sampler has its timesteps (a new one must be added there too).
  for name in SAMPLERS:
    assert len(sampler_timesteps(name, 1000, 4)) == 4
