"""Stage 1 accumulates gradients as stage 2 does: with `train.grad_accum_steps = k`, a train step
is one micro-batch, the generator and the discriminator change on every k-th step only, and then by
exactly the update one step makes on the k micro-batches stacked (at the lr the config implies).

A VQ autoencoder (deterministic, unlike a KL posterior's sample) with an ActNorm discriminator
(no batch statistics) and disc_weight 0 makes every loss a batch mean, so that equality is exact up
to float rounding; the discriminator still trains (its loss has disc_factor, not disc_weight).
The autoencoder is compared by its reconstructions: the biases in front of its GroupNorms get
gradients that are rounding noise (the norm removes them), which Adam scales up to full steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from configs import shapes_autoencoder
from ldm_jax.models import build
from ldm_jax.train import ae_trainer

MICRO = 2   # examples per micro-batch
K = 2       # micro-batches per optimizer update
UPDATES = 2


def _config(batch_size: int, accum: int):
  c = shapes_autoencoder.get_config("tiny")
  c.data.image_size = 16
  c.model.first_stage = common.first_stage("vq", ch=32, ch_mult=(1,), num_res_blocks=1,
                                           resolution=16, z_channels=4, embed_dim=4, n_embed=16)
  c.loss.kind = "vq"
  c.loss.disc_factor = 1.0
  c.loss.disc_start = 0
  c.loss.disc_weight = 0.0
  c.loss.disc_ndf = 8
  c.loss.disc_num_layers = 1
  c.loss.disc_use_actnorm = True
  c.data.batch_size = batch_size
  c.train.grad_accum_steps = accum
  return c


def _run(config, batches, first_images):
  """(the states after each step of stage 1's own step, the autoencoder module)."""
  ae = build.build_first_stage(config.model.first_stage, config.train.compute_dtype)
  disc = ae_trainer.make_discriminator(config)
  opt_g, opt_d = ae_trainer.make_optimizers(config)
  state = ae_trainer.init_state(ae, disc, opt_g, opt_d, first_images, jax.random.PRNGKey(0))
  step = jax.jit(ae_trainer.make_step(ae, disc, config, opt_g, opt_d, use_lpips=False))
  states = [jax.tree.map(np.asarray, state)]
  for batch in batches:
    state, metrics = step(state, {"image": jnp.asarray(batch)}, None)
    assert int(metrics["nonfinite"]) == 0
    states.append(jax.tree.map(np.asarray, state))
  return states, ae


def _trained(state):
  return {"g": state.params, "d": state.disc_vars["params"]}


def _reconstruct(ae, state, images):
  return np.asarray(ae.apply({"params": state.params["autoencoder"]}, jnp.asarray(images))[0])


def _assert_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol)


def _assert_differ(a, b):
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_accumulated_updates_equal_updates_on_the_stacked_batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (UPDATES * K * MICRO, 16, 16, 3)).astype(np.float32)
  first = images[:K * MICRO]  # Both runs initialise (ActNorm included) on the same images.
  micro_cfg, big_cfg = _config(MICRO, K), _config(K * MICRO, 1)
  # The lr follows the effective batch: MICRO x K examples per update in both runs.
  assert micro_cfg.data.batch_size * K == big_cfg.data.batch_size
  micro, ae = _run(micro_cfg, np.split(images, UPDATES * K), first)
  big, _ = _run(big_cfg, np.split(images, UPDATES), first)
  lr = micro_cfg.loss.base_learning_rate * MICRO * K

  for u in range(UPDATES):
    # Between updates nothing trained moves: the micro-steps only accumulate.
    for m in range(1, K):
      _assert_close(_trained(micro[u * K + m]), _trained(micro[u * K]), atol=0)
    _assert_differ(_trained(micro[(u + 1) * K]), _trained(micro[u * K]))
    # The k-th micro-step applies the update of the stacked batch, for both players.
    after, expected = micro[(u + 1) * K], big[u + 1]
    _assert_close(after.disc_vars["params"], expected.disc_vars["params"], atol=1e-3 * lr)
    got, want = _reconstruct(ae, after, images), _reconstruct(ae, expected, images)
    moved = np.max(np.abs(want - _reconstruct(ae, big[u], images)))  # What one update changes.
    assert np.max(np.abs(got - want)) < 1e-2 * moved, (u, np.max(np.abs(got - want)), moved)
  # num_steps counts micro-steps, as in stage 2: K * UPDATES steps made UPDATES updates, of both.
  assert int(micro[-1].step) == K * UPDATES
  assert int(micro[-1].opt_state.gradient_step) == UPDATES
  assert int(micro[-1].disc_opt_state.gradient_step) == UPDATES
