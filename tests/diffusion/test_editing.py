"""img2img (start index and trajectory against diffusers' pipeline rule), strength 1.0, and
inpainting by latent masking with every sampler."""

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


def arrays(seed=0):
  r = np.random.default_rng(seed)
  x0 = 0.8 * np.tanh(r.standard_normal(SHAPE)).astype(np.float32)
  x_T = r.standard_normal(SHAPE).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(x_T)


def stand_in(x, t, cond):
  """A fake eps network; the spatial mean term lets known pixels influence generated ones."""
  del cond
  t = t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
  return 0.8 * x * jnp.sqrt(t) + 0.2 * jnp.tanh(0.5 * x + t) + 0.05 * jnp.mean(x, (1, 2),
                                                                              keepdims=True)


@pytest.fixture(scope='module')
def schedule():
  return Schedule.create('linear', 1000, 0.00085, 0.012)


def diffusers_img2img(sched, x0, noise, steps, strength, begin_index=False):
  """The diffusers img2img pipeline's start (get_timesteps + add_noise), then the plain loop."""
  sched.set_timesteps(steps)
  init = min(int(steps * strength), steps)
  t_start = max(steps - init, 0)
  ts = sched.timesteps[t_start * sched.order:]
  if begin_index:
    sched.set_begin_index(t_start * sched.order)
  x = sched.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)),
                      ts[:1].repeat(SHAPE[0]))
  traj = []
  for t in ts:
    out = stand_in(jnp.asarray(x.numpy()), jnp.full((SHAPE[0],), int(t)), None)
    x = sched.step(torch.from_numpy(np.array(out)), t, x).prev_sample
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
  sched.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
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
  noise = jnp.asarray(np.random.default_rng(1).standard_normal((5,) + SHAPE), jnp.float32)
  for sampler in ('ddim', 'euler_ancestral'):
    kw = dict(sampler=sampler, steps=5, step_noise=noise)
    plain = sample(stand_in, schedule, x_T, None, jax.random.key(2), **kw)
    full = sample(stand_in, schedule, x_T, None, jax.random.key(2), x0=x0, strength=1.0, **kw)
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
