"""LitEma schedule and update against closed forms; TrainState basics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldm_train_toy as toy
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


def _closed_form_ema(p0, params_seq, decay, warmup=True):
  """EMA after n updates, written as one weighted sum (not a recursion).

  With d_k the decay of update k, shadow_n = (prod_k d_k) p0 +
  sum_k (1 - d_k) (prod_{j>k} d_j) p_k.
  """
  n = len(params_seq)
  d = [min(decay, (1 + k) / (10 + k)) if warmup else decay
       for k in range(1, n + 1)]
  out = np.prod(d) * p0
  for k in range(n):
    out = out + (1 - d[k]) * np.prod(d[k + 1:]) * params_seq[k]
  return out


def test_decay_schedule_values():
  got = [float(state_lib.ema_decay_at(n)) for n in (1, 2, 10, 100000)]
  np.testing.assert_allclose(got, [2 / 11, 3 / 12, 11 / 20, 0.9999],
                             rtol=1e-6)
  np.testing.assert_allclose(float(state_lib.ema_decay_at(1, 0.5)), 2 / 11)
  np.testing.assert_allclose(float(state_lib.ema_decay_at(50, 0.5)), 0.5)
  assert float(state_lib.ema_decay_at(1, 0.99, warmup=False)) == np.float32(
      0.99)


def test_ema_update_matches_closed_form():
  rs = np.random.RandomState(0)
  p0 = rs.normal(size=(4, 3)).astype(np.float32)
  seq = [rs.normal(size=(4, 3)).astype(np.float32) for _ in range(5)]
  for decay, warmup in ((0.9999, True), (0.3, True), (0.9, False)):
    ema = {'w': jnp.asarray(p0)}
    for n, p in enumerate(seq, start=1):
      ema = state_lib.ema_update(ema, {'w': jnp.asarray(p)}, n, decay, warmup)
    want = _closed_form_ema(p0.astype(np.float64), seq, decay, warmup)
    np.testing.assert_allclose(np.asarray(ema['w']), want, atol=1e-6)


def test_ema_keeps_storage_dtype():
  ema = {'w': jnp.ones((2,), jnp.bfloat16)}
  out = state_lib.ema_update(ema, {'w': jnp.zeros((2,), jnp.float32)}, 1)
  assert out['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out['w'], np.float32), 2 / 11,
                             rtol=1e-2)


def test_train_step_ema_follows_litema():
  """EMA inside the jitted step, checked against the params it saw."""
  tx = optax.sgd(0.1)
  state = state_lib.create_train_state(toy.init_params(), tx,
                                       jax.random.PRNGKey(0))
  p0 = jax.device_get(state.params)
  train_step = step_lib.make_train_step(toy.loss_fn, tx, ema_decay=0.9,
                                        donate=False)
  seen = []
  for i in range(4):
    state, _ = train_step(state, toy.make_batch(i))
    seen.append(jax.device_get(state.params))
  assert int(state.ema_num_updates) == 4
  for path in (('conv1', 'kernel'), ('fc2', 'bias')):
    get = lambda t: np.asarray(t[path[0]][path[1]], np.float64)
    want = _closed_form_ema(get(p0), [get(s) for s in seen], 0.9)
    np.testing.assert_allclose(get(state.ema_params), want, atol=1e-6)
    assert not np.allclose(want, get(seen[-1]), atol=1e-4)  # EMA lags.


def test_create_train_state_fields():
  tx = optax.adam(1e-3)
  params = toy.init_params()
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(3))
  assert int(state.step) == 0 and int(state.skipped_steps) == 0
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Separate buffers, so both may be donated.
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  no_ema = state_lib.create_train_state(params, tx, jax.random.PRNGKey(3),
                                        use_ema=False)
  assert no_ema.ema_params is None
