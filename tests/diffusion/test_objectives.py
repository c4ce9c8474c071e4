"""q_sample, eps/x0/v conversions and `diffusion_loss` (CompVis p_losses) against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm_jax.diffusion import objectives as obj
from ldm_jax.diffusion.schedules import Schedule, make_betas

SHAPE = (4, 3, 3, 2)
T_IDX = np.array([0, 17, 500, 999])


@pytest.fixture(scope='module')
def schedule():
  return Schedule.create('linear', 1000, 0.0015, 0.0195)


def f64_tables():
  """The CompVis register_schedule arrays recomputed here in float64 (independent of our code)."""
  b = make_betas('linear', 1000, 0.0015, 0.0195)
  ac = np.cumprod(1 - b)
  acp = np.append(1.0, ac[:-1])
  post_var = b * (1 - acp) / (1 - ac)
  with np.errstate(divide='ignore'):
    lvlb = {'eps': b ** 2 / (2 * post_var * (1 - b) * (1 - ac)),
            'x0': 0.5 * np.sqrt(ac) / (2. * 1 - ac),
            'v': np.ones_like(b)}
  for w in lvlb.values():
    w[0] = w[1]
  return ac, lvlb


def data(seed=0):
  r = np.random.default_rng(seed)
  return (r.standard_normal(SHAPE).astype(np.float32), r.standard_normal(SHAPE).astype(np.float32))


def test_q_sample_and_conversions(schedule):
  x0, eps = data()
  ac, _ = f64_tables()
  a = ac[T_IDX][:, None, None, None]
  t = jnp.asarray(T_IDX)
  x_t = obj.q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(eps))
  np.testing.assert_allclose(np.asarray(x_t), np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, atol=1e-6)
  v = obj.v_target(schedule, jnp.asarray(x0), t, jnp.asarray(eps))
  np.testing.assert_allclose(np.asarray(v), np.sqrt(a) * eps - np.sqrt(1 - a) * x0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(obj.predict_x0_from_v(schedule, x_t, t, v)), x0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(obj.predict_eps_from_v(schedule, x_t, t, v)), eps,
                             atol=1e-5)
  # eps -> x0 amplifies by 1/sqrt(a) (~16 at t=999 here): compare at float32 precision.
  x0_back = obj.predict_x0_from_eps(schedule, x_t, t, jnp.asarray(eps))
  np.testing.assert_allclose(np.asarray(x0_back), x0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(obj.predict_eps_from_x0(schedule, x_t, t, jnp.asarray(x0))),
                             eps, atol=1e-4)
  for p, out in (('eps', eps), ('x0', x0), ('v', np.asarray(v))):
    got_x0, got_eps = obj.x0_eps_from_output(jnp.asarray(out), x_t, jnp.asarray(a, jnp.float32), p)
    np.testing.assert_allclose(np.asarray(got_x0), x0, atol=1e-4, err_msg=p)
    np.testing.assert_allclose(np.asarray(got_eps), eps, atol=1e-4, err_msg=p)


@pytest.mark.parametrize('param', ['eps', 'x0', 'v'])
def test_true_prediction_gives_zero_simple_loss(schedule, param):
  x0, eps = data(1)
  t = jnp.asarray(T_IDX)

  def oracle(x_t, t_, cond):
    del x_t, cond
    target = {'eps': eps, 'x0': x0}.get(param)
    return target if target is not None else obj.v_target(schedule, jnp.asarray(x0), t_,
                                                          jnp.asarray(eps))

  loss, m = obj.diffusion_loss(oracle, jnp.asarray(x0), None, jax.random.key(0), schedule,
                               parameterization=param, t=t, noise=jnp.asarray(eps),
                               original_elbo_weight=1.0)
  assert float(m['loss_simple']) == pytest.approx(0.0, abs=1e-10)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize('param,loss_type', [('eps', 'l2'), ('x0', 'l1'), ('v', 'l2')])
def test_loss_formula_with_learned_logvar(schedule, param, loss_type):
  x0, eps = data(2)
  ac, lvlb = f64_tables()
  t = jnp.asarray(T_IDX)
  logvar = np.linspace(-0.5, 0.8, 1000).astype(np.float32)

  def wrong(x_t, t_, cond):
    return 0.5 * jnp.tanh(x_t) + cond * t_.astype(jnp.float32)[:, None, None, None] / 1000.0

  loss, m = obj.diffusion_loss(wrong, jnp.asarray(x0), 0.3, jax.random.key(0), schedule,
                               parameterization=param, loss_type=loss_type,
                               logvar=jnp.asarray(logvar), l_simple_weight=0.7,
                               original_elbo_weight=0.01, t=t, noise=jnp.asarray(eps))
  a = ac[T_IDX][:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  out = 0.5 * np.tanh(x_t) + 0.3 * T_IDX[:, None, None, None] / 1000.0
  target = {'eps': eps, 'x0': x0, 'v': np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[param]
  err = np.abs(out - target) if loss_type == 'l1' else (out - target) ** 2
  simple = err.mean(axis=(1, 2, 3))
  lv = logvar[T_IDX].astype(np.float64)
  gamma = simple / np.exp(lv) + lv
  vlb = (lvlb[param][T_IDX] * simple).mean()
  np.testing.assert_allclose(float(m['loss_simple']), simple.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['loss_gamma']), gamma.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['logvar']), logvar.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['loss_vlb']), vlb, rtol=1e-4)
  np.testing.assert_allclose(float(loss), 0.7 * gamma.mean() + 0.01 * vlb, rtol=1e-5)


def test_min_snr_weights(schedule):
  t = jnp.asarray(T_IDX)
  ref = DDPMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule='scaled_linear')
  snr_ref = compute_snr(ref, torch.from_numpy(T_IDX)).numpy()
  ac, _ = f64_tables()
  snr = ac[T_IDX] / (1 - ac[T_IDX])
  np.testing.assert_allclose(snr_ref, snr, rtol=1e-4)
  gamma = 5.0
  expect = {'eps': np.minimum(snr, gamma) / snr, 'v': np.minimum(snr, gamma) / (snr + 1),
            'x0': np.minimum(snr, gamma)}
  for p, w in expect.items():
    np.testing.assert_allclose(np.asarray(obj.min_snr_weights(schedule, t, gamma, p)), w,
                               rtol=1e-5, err_msg=p)
  # In the loss: the simple term is the weighted per-example mean.
  x0, eps = data(3)
  half = lambda x_t, t_, c: 0.5 * x_t
  _, m = obj.diffusion_loss(half, jnp.asarray(x0), None, jax.random.key(0), schedule, t=t,
                            noise=jnp.asarray(eps), min_snr_gamma=gamma)
  _, m_plain = obj.diffusion_loss(half, jnp.asarray(x0), None, jax.random.key(0), schedule, t=t,
                                  noise=jnp.asarray(eps))
  a = ac[T_IDX][:, None, None, None]
  per_ex = ((0.5 * (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps) - eps) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(float(m['loss_simple']), (expect['eps'] * per_ex).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m_plain['loss_simple']), per_ex.mean(), rtol=1e-5)


def test_random_draws_and_errors(schedule):
  x0, _ = data(4)
  loss, m = jax.jit(lambda r: obj.diffusion_loss(lambda x, t, c: x, jnp.asarray(x0), None, r,
                                                 schedule))(jax.random.key(3))
  assert np.isfinite(float(loss)) and float(m['loss']) == float(loss) and 'loss_gamma' not in m
  with pytest.raises(ValueError, match="parameterization='score'"):
    obj.diffusion_loss(lambda x, t, c: x, jnp.asarray(x0), None, jax.random.key(0), schedule,
                       parameterization='score')
  with pytest.raises(ValueError, match="loss_type='huber'"):
    obj.diffusion_loss(lambda x, t, c: x, jnp.asarray(x0), None, jax.random.key(0), schedule,
                       loss_type='huber')
