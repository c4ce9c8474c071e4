"""Classifier guidance against closed forms, and inside the compiled samplers.

  * A classifier whose logits are linear in x (times a function of t) has a known gradient of
    log p(y | x_t): the guided eps must be eps - s sqrt(1 - a_t) grad, per example.
  * A larger scale moves the guided x0 prediction towards the target class.
  * On data that are two point masses, with the exact denoiser and the exact noisy classifier,
    DDIM and Euler sampling land on both classes unguided and on the target class guided.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import classifier_guidance as cg
from ldm_jax.diffusion.objectives import output_from_x0_eps, x0_eps_from_output
from ldm_jax.diffusion.samplers import sample
from ldm_jax.diffusion.schedules import Schedule

SCHEDULE = Schedule.create("linear", 1000, 0.0015, 0.0155)
SHAPE = (3, 2, 2, 2)  # [B, H, W, C]
D, K = 8, 4


def _linear_problem():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((D, K))
  b = rng.standard_normal(K)
  x = rng.standard_normal(SHAPE)
  eps = rng.standard_normal(SHAPE)
  t = np.array([0, 500, 999])
  labels = np.array([0, 3, 1])
  return w, b, x, eps, t, labels


def _linear_classifier(params, x, t):
  w, b = params
  gain = 1.0 + t.astype(jnp.float32) / 1000.0  # the classifier sees t
  return (x.reshape(x.shape[0], -1) @ w + b) * gain[:, None]  # [B, K]


def _expected_grad(w, b, x, t, labels):
  """d/dx log softmax(c (x W + b))_y = c (W[:, y] - W p), float64."""
  gain = 1.0 + t / 1000.0
  logits = (x.reshape(len(x), -1) @ w + b) * gain[:, None]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  grad = gain[:, None] * (w[:, labels].T - p @ w.T)  # [B, D]
  log_p = np.log(p[np.arange(len(x)), labels])
  return log_p, grad.reshape(x.shape)


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def test_log_prob_and_grad_closed_form():
  w, b, x, _, t, labels = _linear_problem()
  log_p, grad = cg.log_prob_and_grad(_linear_classifier, _f32(w, b), jnp.asarray(x, jnp.float32),
                                     jnp.asarray(t), jnp.asarray(labels))
  want_log_p, want_grad = _expected_grad(w, b, x, t, labels)
  np.testing.assert_allclose(log_p, want_log_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [3.0, np.array([1.0, 2.5, 0.0])])
def test_guided_eps_closed_form(scale):
  w, b, x, eps, t, labels = _linear_problem()
  guided = jax.jit(functools.partial(cg.classifier_guided_eps, classifier=_linear_classifier,
                                     schedule=SCHEDULE))(
      jnp.asarray(eps, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(t),
      jnp.asarray(labels), jnp.asarray(scale, jnp.float32), classifier_params=_f32(w, b))
  a = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t]
  _, grad = _expected_grad(w, b, x, t, labels)
  s = np.broadcast_to(scale, (3,))[:, None, None, None]
  want = eps - s * np.sqrt(1.0 - a)[:, None, None, None] * grad
  np.testing.assert_allclose(guided, want, rtol=1e-5, atol=1e-5)
  # The correction is not negligible: the test would see a missing or mis-scaled term.
  assert np.abs(want - eps).max() > 0.1


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_wrapper_guides_every_parameterization(parameterization):
  """The wrapped denoiser's output implies the guided eps, with x0 consistent with x_t."""
  w, b, x, eps, t, labels = _linear_problem()
  x, eps = _f32(x, eps)
  a = SCHEDULE.alphas_cumprod[t][:, None, None, None]
  x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
  raw = output_from_x0_eps(x0, eps, a, parameterization)
  denoise = lambda x_, t_, cond: raw * cond  # the wrapper must pass its cond through
  guided = cg.classifier_guidance(denoise, _linear_classifier, SCHEDULE,
                                  parameterization=parameterization)
  inputs = cg.GuidanceInputs(jnp.float32(1.0), jnp.asarray(labels), 2.0, _f32(w, b))
  out = jax.jit(guided)(x, jnp.asarray(t), inputs)
  got_x0, got_eps = x0_eps_from_output(out, x, a, parameterization)
  want_eps = cg.classifier_guided_eps(eps, x, jnp.asarray(t), jnp.asarray(labels), 2.0,
                                      classifier=_linear_classifier, classifier_params=_f32(w, b),
                                      schedule=SCHEDULE)
  # t = 999 has a = 4e-5: x0 carries 1 / sqrt(a) ~ 160 times eps's rounding.
  np.testing.assert_allclose(got_eps, want_eps, rtol=1e-4, atol=2e-3)
  np.testing.assert_allclose(got_x0, (x - jnp.sqrt(1.0 - a) * want_eps) / jnp.sqrt(a),
                             rtol=1e-4, atol=2e-2)
  assert np.abs(np.asarray(want_eps) - np.asarray(eps)).max() > 0.1


def test_wrapper_rejects_plain_cond():
  guided = cg.classifier_guidance(lambda x, t, c: x, _linear_classifier, SCHEDULE)
  with pytest.raises(TypeError, match="expected GuidanceInputs"):
    guided(jnp.zeros(SHAPE), jnp.zeros((3,), jnp.int32), None)


def test_larger_scale_raises_target_probability_of_x0():
  """Two classes with logits (w.x, -w.x): the guided x0 prediction's p(target) grows with s."""
  rng = np.random.default_rng(3)
  w = rng.standard_normal(D)
  params = jnp.asarray(np.stack([w, -w], axis=1), jnp.float32)  # [D, 2]
  classifier = lambda p, x, t: x.reshape(x.shape[0], -1) @ p  # t-independent here
  x, eps = _f32(rng.standard_normal(SHAPE), rng.standard_normal(SHAPE))
  t = jnp.array([20, 100, 300])
  labels = jnp.array([0, 1, 0])
  a = SCHEDULE.alphas_cumprod[t][:, None, None, None]
  margins, probs = [], []
  for scale in [0.0, 1.0, 4.0, 16.0, 64.0]:
    guided = cg.classifier_guided_eps(eps, x, t, labels, scale, classifier=classifier,
                                      classifier_params=params, schedule=SCHEDULE)
    x0, _ = x0_eps_from_output(guided, x, a, "eps")
    logits = classifier(params, x0, t)  # [B, 2]
    # The log-odds of the target (p itself saturates at 1 in float32).
    margins.append(np.asarray(logits[jnp.arange(3), labels] - logits[jnp.arange(3), 1 - labels]))
    probs.append(np.asarray(jax.nn.softmax(logits, axis=-1)[jnp.arange(3), labels]))
  margins, probs = np.stack(margins), np.stack(probs)  # [scales, B]
  assert np.all(np.diff(margins, axis=0) > 0), margins
  assert np.all(probs[-1] > 0.99) and np.any(probs[0] < 0.5), probs


# -- two point masses, exact denoiser and classifier ------------------------------------------

MEANS = jnp.asarray(np.stack([np.full((2, 2, 1), 1.0), np.full((2, 2, 1), -1.0)]),
                    jnp.float32)  # [2 classes, H, W, C]


def _mixture_logits(x, t):
  """log p(y | x_t) for x0 = MEANS[y] with equal priors: -|x_t - sqrt(a) m_y|^2 / (2 (1 - a))."""
  a = cg.alphas_cumprod_at(SCHEDULE, t)  # [B]
  d = x[:, None] - jnp.sqrt(a)[:, None, None, None, None] * MEANS[None]  # [B, 2, H, W, C]
  return -jnp.sum(d ** 2, axis=(2, 3, 4)) / (2.0 * (1.0 - a[:, None]))  # [B, 2]


def _mixture_eps(x, t, cond):
  """The exact eps-prediction E[eps | x_t] for the two-point data."""
  del cond
  a = cg.alphas_cumprod_at(SCHEDULE, t)[:, None, None, None]
  p = jax.nn.softmax(_mixture_logits(x, t), axis=-1)  # [B, 2]
  x0 = jnp.einsum("bk,khwc->bhwc", p, MEANS)
  return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_guided_sampling_lands_on_the_target_class(sampler):
  guided = cg.classifier_guidance(_mixture_eps, lambda p, x, t: _mixture_logits(x, t), SCHEDULE)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 2, 2, 1))
  labels = jnp.zeros((64,), jnp.int32)  # every example asks for class 0 (the +1 mass)

  run = jax.jit(lambda scale: sample(guided, SCHEDULE, x_T, cg.GuidanceInputs(None, labels, scale),
                                     jax.random.PRNGKey(1), sampler=sampler, steps=25))
  on_target = lambda x: float(np.mean(np.asarray(x).mean(axis=(1, 2, 3)) > 0))
  unguided, guided_x = run(jnp.float32(0.0)), run(jnp.float32(1.0))
  # Samples sit on the two masses (DDIM stops at t = 0, whose noise has std sqrt(1 - a_0) = 0.04);
  # unguided they split between them, guided they do not.
  assert np.abs(np.abs(np.asarray(unguided)) - 1.0).max() < 0.2
  assert 0.25 < on_target(unguided) < 0.75
  assert on_target(guided_x) == 1.0
  np.testing.assert_allclose(guided_x, 1.0, atol=0.2)


def test_alphas_cumprod_at_fractional_t():
  t_int = jnp.array([0, 1, 250, 999])
  exact = cg.alphas_cumprod_at(SCHEDULE, t_int)
  np.testing.assert_array_equal(exact, SCHEDULE.alphas_cumprod[t_int])
  np.testing.assert_allclose(cg.alphas_cumprod_at(SCHEDULE, t_int.astype(jnp.float32)), exact,
                             rtol=1e-5)
  mid = cg.alphas_cumprod_at(SCHEDULE, jnp.array([250.5]))[0]
  assert SCHEDULE.alphas_cumprod[251] < mid < SCHEDULE.alphas_cumprod[250]
