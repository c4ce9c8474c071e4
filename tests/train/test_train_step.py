"""Train step: sharded == single device, no retrace, memory, non-finite guard."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_train_toy as toy
from ldm_jax import parallel
from ldm_jax.train import optim
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


def _tx():
  return optim.make_optimizer(learning_rate=1e-2, warmup_steps=2,
                              grad_clip_norm=1.0)


def _lr():
  return optim.learning_rate_fn(learning_rate=1e-2, warmup_steps=2)


def _fresh_state():
  return state_lib.create_train_state(toy.init_params(), _tx(),
                                      jax.random.PRNGKey(42))


def _counting(fn, counter):
  def wrapped(*args):
    counter.append(1)  # Runs at trace time only.
    return fn(*args)
  return wrapped


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The single-device reference, shared by the tests below (compiled once).
_PLAIN_STEP = step_lib.make_train_step(toy.loss_fn, _tx(), ema_decay=0.999,
                                       learning_rate_fn=_lr(), donate=False)


def _state_bytes(tree, device):
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def test_sharded_step_matches_single_device_traces_once_and_saves_memory():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})
  batches = [toy.make_batch(s) for s in range(3)]

  ref_state, ref_losses = _fresh_state(), []
  for b in batches:
    ref_state, m = _PLAIN_STEP(ref_state, b)
    ref_losses.append(float(m['loss']))

  # FSDP over 4 devices x 2 data replicas, params born sharded.
  state = parallel.init_sharded(_fresh_state, mesh=mesh,
                                min_size=toy.MIN_SIZE)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  kernel = state.params['conv2']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(
      None, None, None, 'fsdp')
  assert kernel.addressable_shards[0].data.shape == (3, 3, 16, 8)
  assert state.opt_state[1][0].mu['conv2']['kernel'].sharding.spec == (
      kernel.sharding.spec)

  # Per-device bytes of params + EMA + Adam moments: about a quarter.
  full = _fresh_state()
  per_device = _state_bytes(state, jax.devices()[0])
  unsharded = _state_bytes(full, list(full.step.devices())[0])
  assert per_device <= (0.25 + 0.10) * unsharded, (per_device, unsharded)

  traces = []
  train_step = step_lib.make_train_step(
      _counting(toy.loss_fn, traces), _tx(), ema_decay=0.999,
      learning_rate_fn=_lr(), mesh=mesh, state_shardings=shardings)
  # The same from XLA's view of the compiled steps' arguments (state and
  # batch shards per device).
  _, info_s = step_lib.compile_step(train_step, state,
                                    parallel.make_global_batch(batches[0],
                                                               mesh))
  _, info_p = step_lib.compile_step(_PLAIN_STEP, full, batches[0])
  arg_s = info_s['argument_size_in_bytes']
  arg_p = info_p['argument_size_in_bytes']
  assert arg_s <= (0.25 + 0.10) * arg_p, (arg_s, arg_p)
  assert info_p['flops'] > 0

  losses = []
  for b in batches:
    state, m = train_step(state, parallel.make_global_batch(b, mesh))
    losses.append(float(m['loss']))

  # One trace in all: compile_step's lowering, reused by the 3 calls.
  assert len(traces) == 1, f'step traced {len(traces)} times'
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert _max_diff(state.params, ref_state.params) <= 1e-5
  assert _max_diff(state.ema_params, ref_state.ema_params) <= 1e-5
  assert _max_diff(state.opt_state, ref_state.opt_state) <= 1e-5
  assert int(state.step) == 3 and int(state.ema_num_updates) == 3
  # Training moved the params (the comparison is not vacuous) ...
  assert _max_diff(state.params, toy.init_params()) > 1e-3
  # ... and the shardings survived the step.
  assert state.params['conv2']['kernel'].sharding.spec == kernel.sharding.spec
  np.testing.assert_allclose(float(m['lr']), 1e-2)  # Third update: warmed up.


def test_global_batch_is_split_across_devices():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})
  local = toy.make_batch(3, batch_size=16)
  batch = parallel.make_global_batch(local, mesh)
  x = batch['x']
  assert x.shape == (16, 8, 8, 4)
  assert len(x.addressable_shards) == 8
  starts = set()
  for shard in x.addressable_shards:
    assert shard.data.shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(np.asarray(shard.data), local['x'][shard.index])
    starts.add(shard.index[0].start)
  assert starts == set(range(0, 16, 2))  # 8 distinct slices, none repeated.
  with pytest.raises(ValueError, match=r"\['x'\].*divisible by the 8"):
    parallel.make_global_batch({'x': np.zeros((12, 2))}, mesh)


def _nan_when_flagged(params, batch, rng):
  loss, metrics = toy.loss_fn(params, batch, rng)
  return loss * batch['scale'][0], metrics


def test_nonfinite_skip_keeps_params_and_counts():
  train_step = step_lib.make_train_step(_nan_when_flagged, _tx(),
                                        ema_decay=0.99, nonfinite='skip',
                                        donate=False)
  state = _fresh_state()
  good = dict(toy.make_batch(0), scale=np.ones((16,), np.float32))
  bad = dict(toy.make_batch(1), scale=np.full((16,), np.nan, np.float32))
  state, m = train_step(state, good)
  assert int(m['nonfinite']) == 0
  before = state
  state, m = train_step(state, bad)
  assert int(m['nonfinite']) == 1 and int(m['skipped_steps']) == 1
  assert int(state.skipped_steps) == 1 and int(state.step) == 2
  assert _max_diff(state.params, before.params) == 0.0
  assert _max_diff(state.ema_params, before.ema_params) == 0.0
  assert _max_diff(state.opt_state, before.opt_state) == 0.0
  assert int(state.ema_num_updates) == 1
  state, m = train_step(state, good)  # Training carries on.
  assert int(m['nonfinite']) == 0 and int(state.skipped_steps) == 1
  assert _max_diff(state.params, before.params) > 0.0
  assert np.isfinite(jax.tree.leaves(state.params)[0]).all()


def test_nonfinite_stop_raises_naming_the_step():
  train_step = step_lib.make_train_step(_nan_when_flagged, _tx(),
                                        nonfinite='stop', donate=False)
  state = _fresh_state()
  good = dict(toy.make_batch(0), scale=np.ones((16,), np.float32))
  bad = dict(toy.make_batch(1), scale=np.full((16,), np.inf, np.float32))
  for step in range(3):
    state, m = train_step(state, good if step < 2 else bad)
    if step < 2:
      step_lib.check_finite(m, step)
  with pytest.raises(step_lib.NonFiniteError, match=re.escape('at step 2')):
    step_lib.check_finite(m, 2)
  assert np.isfinite(np.asarray(state.params['fc2']['kernel'])).all()
  with pytest.raises(ValueError, match="nonfinite='ignore'"):
    step_lib.make_train_step(toy.loss_fn, _tx(), nonfinite='ignore')


def test_bf16_compute_keeps_fp32_master_params():
  state = _fresh_state()
  batch = toy.make_batch(0)
  bf16_step = step_lib.make_train_step(toy.loss_fn, _tx(), donate=False,
                                       ema_decay=0.999,
                                       compute_dtype=jnp.bfloat16)
  new32, m32 = _PLAIN_STEP(state, batch)
  new16, m16 = bf16_step(state, batch)
  for leaf in jax.tree.leaves(new16.params) + jax.tree.leaves(new16.ema_params):
    assert leaf.dtype == jnp.float32
  assert m16['loss'].dtype == jnp.float32
  # bf16 has ~3 significant digits: close to, but not equal to, fp32.
  np.testing.assert_allclose(float(m16['loss']), float(m32['loss']), rtol=2e-2)
  assert float(m16['loss']) != float(m32['loss'])
  np.testing.assert_allclose(float(m16['grad_norm']), float(m32['grad_norm']),
                             rtol=5e-2)
