"""Optimizers against torch.optim, schedules against closed forms, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import ldm_train_toy as toy
from ldm_jax.train import optim
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


def test_warmup_and_decay_schedules():
  lr = 2e-4
  const = optim.learning_rate_fn(learning_rate=lr, warmup_steps=100)
  np.testing.assert_allclose(
      [float(const(s)) for s in (0, 1, 50, 100, 5000)],
      [0.0, lr / 100, lr / 2, lr, lr], rtol=1e-6)
  cos = optim.learning_rate_fn(learning_rate=lr, warmup_steps=10,
                               schedule='cosine', total_steps=110,
                               end_lr_factor=0.1)
  for s in (5, 10, 35, 60, 110, 200):
    p = min(max((s - 10) / 100, 0), 1)
    want = (0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * p))) * min(
        1, s / 10)
    np.testing.assert_allclose(float(cos(s)), want, rtol=1e-5)
  lin = optim.learning_rate_fn(learning_rate=lr, schedule='linear',
                               total_steps=40)
  np.testing.assert_allclose([float(lin(s)) for s in (0, 10, 40, 99)],
                             [lr, 0.75 * lr, 0.0, 0.0], rtol=1e-6, atol=1e-12)
  with pytest.raises(ValueError, match="schedule='cosine' needs total_steps"):
    optim.learning_rate_fn(learning_rate=lr, schedule='cosine')
  with pytest.raises(ValueError, match="schedule='step'"):
    optim.learning_rate_fn(learning_rate=lr, schedule='step')


def test_scale_lr_by_batch():
  # LDM: lr = accumulate_grad_batches * n_gpus * batch_size * base_lr.
  assert optim.scale_lr_by_batch(1e-6, 8 * 12) == pytest.approx(9.6e-5)
  assert optim.scale_lr_by_batch(1e-6, 96, 2) == pytest.approx(1.92e-4)
  with pytest.raises(ValueError, match='global_batch=0'):
    optim.scale_lr_by_batch(1e-6, 0)


def _random_problem(seed=0):
  rs = np.random.RandomState(seed)
  params = {'a': rs.normal(size=(5, 3)).astype(np.float32),
            'b': rs.normal(size=(3,)).astype(np.float32)}
  # Large gradients, so clipping at norm 1 is active on every step.
  grads = [{k: (5 * rs.normal(size=v.shape)).astype(np.float32)
            for k, v in params.items()} for _ in range(4)]
  return params, grads


def _run_torch(params, grads, make_opt, clip):
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  opt = make_opt(list(tp.values()))
  for g in grads:
    for k, p in tp.items():
      p.grad = torch.tensor(g[k])
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
    opt.step()
  return {k: p.detach().numpy() for k, p in tp.items()}


def _run_optax(params, grads, tx):
  params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state,
                                   params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('clip', [None, 1.0])
def test_adamw_matches_torch(clip):
  params, grads = _random_problem()
  tx = optim.make_optimizer(learning_rate=1e-2, weight_decay=0.05, b1=0.8,
                            b2=0.95, eps=1e-6, grad_clip_norm=clip)
  ours = _run_optax(params, grads, tx)
  ref = _run_torch(params, grads, lambda p: torch.optim.AdamW(
      p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05), clip)
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=1e-6)
    assert not np.allclose(ref[k], params[k], atol=1e-3)


def test_clipping_really_changes_the_update():
  params, grads = _random_problem(1)
  sgd_like = dict(learning_rate=1e-2, weight_decay=0.0)
  clipped = _run_optax(params, grads[:1], optim.make_optimizer(
      grad_clip_norm=1e-3, b1=0.0, b2=0.0, eps=1.0, **sgd_like))
  # With b1 = b2 = 0 and eps = 1, Adam's step is lr * g / (|g| + 1): a
  # clipped gradient g' = g * 1e-3 / ||g|| must give exactly that.
  g = grads[0]
  norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                       for v in g.values()))
  for k in params:
    gc = g[k] * (1e-3 / norm)
    want = params[k] - 1e-2 * gc / (np.abs(gc) + 1.0)
    np.testing.assert_allclose(np.asarray(clipped[k]), want, atol=1e-7)


def test_gan_adam_matches_torch():
  params, grads = _random_problem(2)
  ours = _run_optax(params, grads, optim.make_gan_optimizer(learning_rate=3e-3))
  ref = _run_torch(params, grads, lambda p: torch.optim.Adam(
      p, lr=3e-3, betas=(0.5, 0.9)), None)
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
  k = 3
  micro = [toy.make_batch(s, batch_size=4) for s in range(k)]
  big = jax.tree.map(lambda *xs: np.concatenate(xs), *micro)
  # A large eps keeps Adam from normalising the gradient away, so averaging
  # (right) and summing (wrong) the micro-gradients give different updates.
  kw = dict(learning_rate=5e-3, warmup_steps=2, eps=0.1)
  lr_fn = optim.learning_rate_fn(learning_rate=5e-3, warmup_steps=2)

  def run(tx, batches, accum):
    state = state_lib.create_train_state(toy.init_params(), tx,
                                         jax.random.PRNGKey(0), use_ema=False)
    train_step = step_lib.make_train_step(
        toy.deterministic_loss_fn, tx, ema_decay=None, donate=False,
        learning_rate_fn=lr_fn, grad_accum_steps=accum)
    lrs = []
    for b in batches:
      state, m = train_step(state, b)
      lrs.append(float(m['lr']))
    return state.params, lrs

  init = toy.init_params()
  # Two optimizer updates each: warmup lr 0 then lr/2, so both count.
  p_big, lr_big = run(optim.make_optimizer(**kw), [big, big], 1)
  p_acc, lr_acc = run(optim.make_optimizer(grad_accum_steps=k, **kw),
                      micro + micro, k)
  for a, b, c in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big),
                     jax.tree.leaves(init)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert max(float(np.abs(np.asarray(b) - np.asarray(c)).max())
             for b, c in zip(jax.tree.leaves(p_big),
                             jax.tree.leaves(init))) > 1e-4
  np.testing.assert_allclose(lr_big, [0.0, 2.5e-3])
  np.testing.assert_allclose(lr_acc, [0.0] * k + [2.5e-3] * k)


def test_stage2_schedule_decays_over_the_runs_optimizer_updates():
  from configs import common
  from ldm_jax.train import ldm_trainer
  c = common.base_config()
  c.train.update(num_steps=8, grad_accum_steps=2, schedule='cosine',
                 warmup_steps=0, learning_rate=1e-3, scale_lr_by_batch=False)
  _, lr_fn = ldm_trainer.make_optimizer(c)
  # 8 micro-steps make 4 updates: the cosine ends at the 4th, not halfway.
  np.testing.assert_allclose(float(lr_fn(0)), 1e-3)
  np.testing.assert_allclose(float(lr_fn(2)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr_fn(4)), 0.0, atol=1e-12)
  c.train.warmup_steps = 4
  with pytest.raises(ValueError, match=r'num_steps // grad_accum_steps = 8 // 2 = 4'):
    ldm_trainer.make_optimizer(c)
