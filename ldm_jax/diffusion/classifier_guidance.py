"""Classifier guidance (Dhariwal & Nichol 2021) for eps / x0 / v denoisers, as pure functions.

With a = alphas_cumprod[t], a classifier p(y | x_t, t) trained on noised inputs and a scale s, the
guided noise prediction is (the paper's Algorithm 2, the DDIM form; guided-diffusion's
`condition_score`)

  eps' = eps - s * sqrt(1 - a) * grad_{x_t} log p(y | x_t, t)

so the x0 prediction moves by s * (1 - a) / sqrt(a) * grad and every sampler that reads eps or x0
(DDIM, PLMS, DPM-Solver++, Euler) follows the class-conditional score. With the ancestral DDPM
sampler this is the same score form, not the paper's Algorithm 1 (which shifts the posterior mean
by s * variance * grad). For latent diffusion
everything lives in the latent space: CompVis trains its `NoisyLatentImageClassifier` on
`q_sample(z0, t)` of the scaled first-stage latents z0 at the DDPM index t in [0, T), the same
integer the denoiser gets, and its DDIM sampler applies a corrector to e_t at that t
(`score_corrector.modify_score(model, e_t, x, t, c)`) before forming the x0 prediction. So the
classifier here sees exactly what the denoiser sees, (x_t, t), with t the training index of the
step (not the step's position in a shortened sampling grid); the autoencoder is not involved.

  * `log_prob_and_grad(classifier, params, x_t, t, labels)`: log p(y | x_t, t) [B] and its gradient.
  * `guide_eps(eps, grad, a, scale)`: the formula above.
  * `classifier_guided_eps(...)`: the two together, for a sampler that holds eps.
  * `classifier_guidance(denoise, classifier, schedule, parameterization)`: wraps a denoiser so the
    samplers of `diffusion.samplers` run guided without change; labels, scale and the classifier's
    parameters travel in the conditioning, so changing them does not recompile the loop.
  * `guide_output(out, x_t, t, labels, scale, ...)`: the wrapper's body, a denoiser's output ->
    the guided output, for callers that build their own (hashable) denoiser.

The classifier is any function `classifier(params, x, t) -> logits [B, K]` (log-probabilities work
too: log_softmax leaves them unchanged). It must treat examples independently (the EncoderUNet's
GroupNorms do), since one gradient of the batch's summed log-probabilities gives every example's
own gradient.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.objectives import (check_parameterization, output_from_x0_eps,
                                          x0_eps_from_output)
from ldm_jax.diffusion.schedules import Schedule

Classifier = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


class GuidanceInputs(NamedTuple):
  """The conditioning of a `classifier_guidance`-wrapped denoiser (a pytree).

  cond: the wrapped denoiser's own conditioning, passed through unchanged.
  labels: [B] int target classes.
  scale: the guidance scale s, a scalar or [B] (0 = unguided).
  classifier_params: the first argument of `classifier`.
  """
  cond: Any
  labels: jnp.ndarray
  scale: Any
  classifier_params: Any = None


def _per_example(values, ndim: int) -> jnp.ndarray:
  """A scalar or [B] -> broadcastable over [B, H, W, C], in float32."""
  values = jnp.asarray(values, jnp.float32)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def alphas_cumprod_at(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """alphas_cumprod at timesteps t [B]: exact for integer t; for fractional t (Euler's grid)
  interpolated in sigma = sqrt((1 - a) / a), as `samplers_dpm` places its steps. Returns [B]."""
  if jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
    return schedule.alphas_cumprod[t]
  ac = schedule.alphas_cumprod
  sigmas = jnp.sqrt((1.0 - ac) / ac)  # [T]
  sigma = jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(ac.shape[0], dtype=jnp.float32),
                     sigmas)
  return 1.0 / (1.0 + sigma ** 2)


def log_prob_and_grad(classifier: Classifier, params: Any, x_t: jnp.ndarray, t: jnp.ndarray,
                      labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """log p(labels | x_t, t) [B] and its gradient with respect to x_t [B, H, W, C], both float32.

  x_t: [B, H, W, C]; t: [B] (what the denoiser gets); labels: [B] ints in [0, K).
  """
  labels = jnp.asarray(labels, jnp.int32)

  def total(x):
    log_p = jax.nn.log_softmax(classifier(params, x, t).astype(jnp.float32), axis=-1)  # [B, K]
    chosen = jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]  # [B]
    return chosen.sum(), chosen

  grad, log_p = jax.grad(total, has_aux=True)(x_t.astype(jnp.float32))
  return log_p, grad


def guide_eps(eps: jnp.ndarray, grad: jnp.ndarray, alphas_cumprod: jnp.ndarray,
              scale) -> jnp.ndarray:
  """eps - scale * sqrt(1 - a) * grad.  eps, grad: [B, H, W, C]; a, scale: scalars or [B]."""
  a = _per_example(alphas_cumprod, eps.ndim)
  return eps.astype(jnp.float32) - _per_example(scale, eps.ndim) * jnp.sqrt(1.0 - a) * grad


def classifier_guided_eps(eps: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                          labels: jnp.ndarray, scale, *, classifier: Classifier,
                          classifier_params: Any, schedule: Schedule) -> jnp.ndarray:
  """The guided eps [B, H, W, C] (float32) for the denoiser's eps at (x_t, t)."""
  _, grad = log_prob_and_grad(classifier, classifier_params, x_t, t, labels)
  return guide_eps(eps, grad, alphas_cumprod_at(schedule, t), scale)


def classifier_guidance(denoise: Callable, classifier: Classifier, schedule: Schedule, *,
                        parameterization: str = "eps") -> Callable:
  """Wraps `denoise(x, t, cond)` into a classifier-guided denoiser over `GuidanceInputs`.

  The wrapped function returns the guided output in the denoiser's own parameterization (eps, x0
  or v; for x0 and v, the guided eps and the x0 consistent with it and x_t), so it drops into
  `samplers.sample(..., parameterization=...)` unchanged. Keep the wrapper (it is a static
  argument of `sample`): making a new one recompiles the loop.
  """
  check_parameterization(parameterization)

  def guided(x, t, inputs: GuidanceInputs):
    if not isinstance(inputs, GuidanceInputs):
      raise TypeError(f"classifier_guidance: cond is a {type(inputs).__name__}; expected "
                      f"GuidanceInputs(cond, labels, scale, classifier_params).")
    out = denoise(x, t, inputs.cond)
    return guide_output(out, x, t, inputs.labels, inputs.scale, classifier=classifier,
                        classifier_params=inputs.classifier_params, schedule=schedule,
                        parameterization=parameterization)

  return guided


def guide_output(out: jnp.ndarray, x: jnp.ndarray, t: jnp.ndarray, labels: jnp.ndarray, scale,
                 *, classifier: Classifier, classifier_params: Any, schedule: Schedule,
                 parameterization: str = "eps") -> jnp.ndarray:
  """A denoiser's output `out` at (x [B, H, W, C], t [B]) -> the classifier-guided output, in the
  same parameterization (float32): the guided eps, and for x0 / v the x0 consistent with it and x.

  The one body of every guided denoiser (`classifier_guidance`, and the sampling loop of
  `ldm_jax.sampling`, which carries the schedule in its traced conditioning).
  """
  a_t = alphas_cumprod_at(schedule, t)  # [B]
  a = _per_example(a_t, x.ndim)  # [B, 1, 1, 1]
  _, eps = x0_eps_from_output(out, x, a, parameterization)
  _, grad = log_prob_and_grad(classifier, classifier_params, x, t, labels)
  eps = guide_eps(eps, grad, a_t, scale)
  x0 = (x.astype(jnp.float32) - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
  return output_from_x0_eps(x0, eps, a, parameterization)
