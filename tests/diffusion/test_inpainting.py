"""Inpainting by latent masking, with every sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.samplers import SAMPLERS, sample
from ldm_jax.diffusion.schedules import Schedule

SHAPE = (2, 4, 4, 3)


@pytest.fixture(scope='module')
def schedule():
  return Schedule.create('linear', 1000, 0.00085, 0.012)


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
  # so a different known region must change them: masking acts at every step, not only at the end.
  assert float(jnp.abs(a[:, 2:] - b[:, 2:]).max()) > 1e-3


def test_inpainting_with_strength(schedule):
  """Masking composes with img2img: the generated region starts from the noised x0."""
  x0, x_T = arrays(2)
  mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, :, :2].set(1.0)  # keep the left two columns
  out = sample(stand_in, schedule, x_T, None, jax.random.key(3), sampler='ddim', steps=10,
               x0=x0, mask=mask, strength=0.3)
  np.testing.assert_array_equal(np.asarray(out[:, :, :2]), np.asarray(x0[:, :, :2]))
  # Three of ten steps from x0 noised to t=201 stay close to x0 in the generated region too.
  assert float(jnp.abs(out[:, :, 2:] - x0[:, :, 2:]).mean()) < 0.5
