"""Every sampler's full trajectory against the diffusers (torch) schedulers, step by step.

The stand-in denoiser is the same elementwise closed form in torch and jnp, so the only thing
compared is the sampler arithmetic; the same per-step noise is fed to both (diffusers'
`variance_noise`, or its `randn_tensor` replaced by one that hands out our noise). Max abs error <=
1e-5 on every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from ldm_jax.diffusion.samplers import sample, sampler_timesteps
from ldm_jax.diffusion.schedules import Schedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
          num_train_timesteps=1000)
PRED = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
SHAPE = (2, 6, 6, 4)
TOL = 1e-5


def stand_in(x, t, lib):
  """A fake network output, the same elementwise closed form in torch and jnp; x [B,H,W,C], t [B].

  Roughly the optimal eps for Gaussian data of variance 0.25 under a cosine-like alpha_bar(t),
  perturbed by a tanh of x and t, so trajectories stay O(1) like real ones and errors are not
  hidden by (or blamed on) exploding values.
  """
  t = t.reshape((-1, 1, 1, 1)) / 1000.0
  ab = lib.cos(0.5 * 3.14159265 * 0.95 * t) ** 2
  gauss_eps = x * lib.sqrt(1.0 - ab) / (0.25 * ab + 1.0 - ab)
  return gauss_eps * (1.0 + 0.2 * lib.tanh(0.3 * x + 2.0 * t)) + 0.05 * lib.sin(3.0 * t)


def jax_denoise(x, t, cond):
  del cond
  return stand_in(x, t.astype(jnp.float32), jnp)


@pytest.fixture(scope='module')
def schedule():
  return Schedule.create('linear', 1000, 0.00085, 0.012)


def inputs(n_noise, seed=0):
  rng = np.random.default_rng(seed)
  x_T = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal((n_noise,) + SHAPE).astype(np.float32)
  return x_T, noise


def same_table(sched, schedule):
  """Hands diffusers our alphas_cumprod (float64-derived) instead of its float32 cumprod.

  The tables agree to ~1e-6 relative (tested in test_schedules); sharing one isolates the sampler
  arithmetic, which is what this file compares, from 1000-term cumprod rounding.
  """
  table = torch.from_numpy(np.array(schedule.alphas_cumprod))
  sched.alphas_cumprod = table
  if hasattr(sched, 'final_alpha_cumprod'):
    sched.final_alpha_cumprod = table[0]
  return sched


def make_ref(schedule, cls, **kw):
  return same_table(cls(**SD, **kw), schedule)


def run_diffusers(sched, x_init, steps, step_kwargs=lambda i: {}):
  sched.set_timesteps(steps)
  x = torch.from_numpy(x_init)
  traj, ts = [], []
  for i, t in enumerate(sched.timesteps):
    inp = sched.scale_model_input(x, t)
    out = stand_in(inp, torch.full((SHAPE[0],), float(t)), torch)
    x = sched.step(out, t, x, **step_kwargs(i)).prev_sample
    traj.append(x.numpy().copy())
    ts.append(float(t))
  return np.stack(traj), ts


def run_ours(schedule, sampler, x_T, steps, noise=None, **kw):
  _, traj = sample(jax_denoise, schedule, jnp.asarray(x_T), None, jax.random.key(0),
                   sampler=sampler, steps=steps, return_trajectory=True,
                   step_noise=None if noise is None else jnp.asarray(noise), **kw)
  return np.asarray(traj)


def feed_randn(monkeypatch, module, noise):
  it = iter(torch.from_numpy(n.copy()) for n in noise)
  monkeypatch.setattr(module, 'randn_tensor', lambda *a, **k: next(it))


def assert_traj(ours, ref):
  """Each step agrees to TOL of max(1, its largest |value|): float32 rounding grows with the
  values, and Euler-type samplers start at sigma_max ~ 15 (step 0 of euler_ancestral, v, 15 steps
  differed by 1.2e-5 at values ~10 against diffusers 0.42)."""
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  axes = tuple(range(1, ours.ndim))
  err = np.abs(ours - ref).max(axis=axes)
  scale = np.maximum(1.0, np.abs(ref).max(axis=axes))
  assert (err <= TOL * scale).all(), f'per-step max abs error {err}, value scale {scale}'


@pytest.mark.parametrize('steps,eta,param', [(10, 0.0, 'eps'), (7, 0.0, 'v'), (10, 0.8, 'eps'),
                                             (10, 1.0, 'x0'), (1, 0.0, 'eps')])
def test_ddim(schedule, steps, eta, param):
  x_T, noise = inputs(steps)
  ref_sched = make_ref(schedule, DDIMScheduler, timestep_spacing='leading', steps_offset=1,
                       set_alpha_to_one=False, clip_sample=False, prediction_type=PRED[param])
  ref, ts = run_diffusers(ref_sched, x_T, steps, lambda i: dict(
      eta=eta, variance_noise=torch.from_numpy(noise[i]) if eta > 0 else None))
  np.testing.assert_array_equal(sampler_timesteps('ddim', 1000, steps), ts)
  ours = run_ours(schedule, 'ddim', x_T, steps, noise if eta > 0 else None, eta=eta,
                  parameterization=param)
  assert_traj(ours, ref)


@pytest.mark.parametrize('steps', [1, 2, 5, 12])
def test_plms(schedule, steps):
  x_T, _ = inputs(0)
  ref_sched = make_ref(schedule, PNDMScheduler, skip_prk_steps=True, steps_offset=1,
                       set_alpha_to_one=False)
  ref, ts = run_diffusers(ref_sched, x_T, steps)
  assert len(ref) == (steps + 1 if steps > 1 else 1)  # the first step's two model calls
  ours = run_ours(schedule, 'plms', x_T, steps)
  assert_traj(ours, ref)


@pytest.mark.parametrize('steps,param', [(20, 'eps'), (8, 'v'), (10, 'x0'), (1000, 'eps')])
def test_ddpm(schedule, monkeypatch, steps, param):
  x_T, noise = inputs(steps)
  feed_randn(monkeypatch, scheduling_ddpm, noise)
  ref_sched = make_ref(schedule, DDPMScheduler, clip_sample=False, prediction_type=PRED[param])
  ref, _ = run_diffusers(ref_sched, x_T, steps)
  ours = run_ours(schedule, 'ddpm', x_T, steps, noise, parameterization=param)
  assert_traj(ours, ref)


def test_ddpm_clip_x0(schedule, monkeypatch):
  x_T, noise = inputs(6)
  feed_randn(monkeypatch, scheduling_ddpm, noise)
  ref_sched = make_ref(schedule, DDPMScheduler, clip_sample=True, prediction_type='epsilon')
  ref, _ = run_diffusers(ref_sched, x_T, 6)
  assert_traj(run_ours(schedule, 'ddpm', x_T, 6, noise, clip_x0=True), ref)


@pytest.mark.parametrize('steps,param', [(10, 'eps'), (20, 'v'), (6, 'x0'), (1, 'eps'),
                                         (2, 'eps')])
def test_dpmpp_2m(schedule, steps, param):
  x_T, _ = inputs(0)
  ref_sched = make_ref(schedule, DPMSolverMultistepScheduler, algorithm_type='dpmsolver++',
                       solver_order=2, prediction_type=PRED[param])
  ref, ts = run_diffusers(ref_sched, x_T, steps)
  np.testing.assert_array_equal(sampler_timesteps('dpmpp_2m', 1000, steps), ts)
  assert_traj(run_ours(schedule, 'dpmpp_2m', x_T, steps, parameterization=param), ref)


@pytest.mark.parametrize('steps,param', [(10, 'eps'), (15, 'v'), (1, 'eps')])
def test_euler_ancestral(schedule, monkeypatch, steps, param):
  x_T, noise = inputs(steps)
  feed_randn(monkeypatch, scheduling_euler_ancestral_discrete, noise)
  ref_sched = make_ref(schedule, EulerAncestralDiscreteScheduler, prediction_type=PRED[param])
  ref_sched.set_timesteps(steps)
  # diffusers starts pure noise at x_T * init_noise_sigma; so do we.
  x_init = (torch.from_numpy(x_T) * ref_sched.init_noise_sigma).numpy()
  ref, ts = run_diffusers(ref_sched, x_init, steps)
  np.testing.assert_allclose(sampler_timesteps('euler_ancestral', 1000, steps), ts)
  assert_traj(run_ours(schedule, 'euler_ancestral', x_T, steps, noise, parameterization=param),
              ref)


@pytest.fixture(scope='module')
def zsnr():
  return Schedule.create('linear', 1000, 0.00085, 0.012, zero_terminal_snr=True)


def test_ddim_trailing_zero_snr(zsnr):
  """Lin et al. 2023's recipe: zero terminal SNR, v prediction, 'trailing' grid from t = 999."""
  x_T, _ = inputs(0)
  ref_sched = make_ref(zsnr, DDIMScheduler, timestep_spacing='trailing', set_alpha_to_one=False,
                       clip_sample=False, prediction_type='v_prediction',
                       rescale_betas_zero_snr=True)
  ref, ts = run_diffusers(ref_sched, x_T, 10)
  assert ts[0] == 999 and float(ref_sched.alphas_cumprod[999]) == 0.0
  np.testing.assert_array_equal(sampler_timesteps('ddim', 1000, 10, 'trailing'), ts)
  assert_traj(run_ours(zsnr, 'ddim', x_T, 10, parameterization='v', grid='trailing'), ref)


def test_dpmpp_2m_zero_snr(zsnr):
  """diffusers steps from alphas_cumprod[-1] = 2^-24 instead of 0; so do we."""
  x_T, _ = inputs(0)
  ref_sched = make_ref(zsnr, DPMSolverMultistepScheduler, algorithm_type='dpmsolver++',
                       solver_order=2, prediction_type='v_prediction', rescale_betas_zero_snr=True)
  ref_sched.alphas_cumprod[-1] = 2.0 ** -24
  ref, _ = run_diffusers(ref_sched, x_T, 8)
  assert_traj(run_ours(zsnr, 'dpmpp_2m', x_T, 8, parameterization='v'), ref)
