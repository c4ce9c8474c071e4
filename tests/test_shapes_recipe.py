"""The quickstart autoencoder's learning-rate schedule reaches its optimizer: warmup from 0, the
peak lr, cosine decay to 0 at the last step; the 'tiny' variant stays constant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import shapes_autoencoder
from ldm_jax.train import ae_trainer


def _first_update(config, step: int) -> float:
  """|update| of one parameter with gradient 1 when the optimizer is at `step` (Adam's first
  step normalises the gradient to 1, so this is the learning rate in force at that step)."""
  opt, _ = ae_trainer.make_optimizers(config)
  params = {"w": jnp.zeros((1,), jnp.float32)}
  state = opt.init(params)
  # Set the schedule's step counter; Adam's moments stay at their first step.
  state = jax.tree.map(lambda s: optax.ScaleByScheduleState(count=jnp.asarray(step, jnp.int32))
                       if isinstance(s, optax.ScaleByScheduleState) else s, state,
                       is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
  updates, _ = opt.update({"w": jnp.ones((1,), jnp.float32)}, state, params)
  return float(jnp.abs(updates["w"][0]))


def test_quickstart_autoencoder_warms_up_peaks_and_decays_to_zero():
  c = shapes_autoencoder.get_config()
  peak = c.loss.base_learning_rate * c.data.batch_size
  assert c.train.schedule == "cosine" and 0 < c.train.warmup_steps < c.train.num_steps
  assert _first_update(c, 0) == 0.0
  np.testing.assert_allclose(_first_update(c, c.train.warmup_steps), peak, rtol=1e-4)
  middle = (c.train.warmup_steps + c.train.num_steps) // 2
  np.testing.assert_allclose(_first_update(c, middle), peak / 2, rtol=1e-2)
  assert _first_update(c, c.train.num_steps) < 1e-6 * peak


def test_tiny_variant_keeps_a_constant_rate():
  c = shapes_autoencoder.get_config("tiny")
  peak = c.loss.base_learning_rate * c.data.batch_size
  np.testing.assert_allclose(_first_update(c, 0), peak, rtol=1e-4)
