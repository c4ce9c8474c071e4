"""img2img: start index and trajectory against diffusers' pipeline rule, and strength 1.0.

Inpainting is in test_inpainting.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from ldm_jax.diffusion.samplers import sample, sampler_timesteps
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


def diffusers_img2img(sched, x0, noise, steps, strength):
  """The diffusers img2img pipeline's start (get_timesteps + add_noise), then the plain loop."""
  sched.set_timesteps(steps)
  init = min(int(steps * strength), steps)
  t_start = max(steps - init, 0)
  ts = sched.timesteps[t_start * sched.order:]
  if hasattr(sched, 'set_begin_index'):
    sched.set_begin_index(t_start * sched.order)
  x = sched.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)),
                      ts[:1].repeat(SHAPE[0]))
  traj = []
  for t in ts:
    inp = sched.scale_model_input(x, t)
    out = stand_in(jnp.asarray(inp.numpy()), jnp.full((SHAPE[0],), float(t)), None)
    x = sched.step(torch.from_numpy(np.array(out)), t, x).prev_sample
    traj.append(x.numpy())
  return np.stack(traj), [float(t) for t in ts]


@pytest.mark.parametrize('sampler,steps,strength', [('ddim', 10, 0.55), ('ddim', 7, 0.3),
                                                    ('dpmpp_2m', 10, 0.75),
                                                    ('euler_ancestral', 9, 0.5)])
def test_img2img_matches_diffusers(schedule, monkeypatch, sampler, steps, strength):
  x0, noise = arrays(5)
  step_noise = None
  if sampler == 'ddim':
    sched = DDIMScheduler(**SD, timestep_spacing='leading', steps_offset=1, set_alpha_to_one=False,
                          clip_sample=False)
  elif sampler == 'dpmpp_2m':
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type='dpmsolver++', solver_order=2)
  else:
    sched = EulerAncestralDiscreteScheduler(**SD)
    step_noise = np.random.default_rng(2).standard_normal((steps,) + SHAPE).astype(np.float32)
    it = iter(torch.from_numpy(n.copy()) for n in step_noise)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, 'randn_tensor',
                        lambda *a, **k: next(it))
  sched.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
  if hasattr(sched, 'final_alpha_cumprod'):
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
  ref, ref_ts = diffusers_img2img(sched, x0, noise, steps, strength)
  skip = img2img_skip(steps, strength)
  np.testing.assert_allclose(sampler_timesteps(sampler, 1000, steps)[skip:], ref_ts)
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise[:len(ref_ts)])
  _, traj = sample(stand_in, schedule, noise, None, jax.random.key(0), sampler=sampler,
                   steps=steps, x0=x0, strength=strength, return_trajectory=True,
                   step_noise=step_noise)
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
