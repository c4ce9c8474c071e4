"""Classifier-free guidance: one batched pass equals two calls combined; rescale vs diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm_jax.diffusion.guidance import (classifier_free_guidance, combine_guidance,
                                      rescale_guidance)
from ldm_jax.diffusion.samplers import sample
from ldm_jax.diffusion.schedules import Schedule

SHAPE = (3, 4, 4, 2)


def net(x, t, ctx):
  """A fake conditional network whose output depends on x, t and a [B, 5] context non-linearly."""
  t = t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
  c = jnp.tanh(ctx @ jnp.linspace(-1.0, 1.0, 5 * x.shape[-1]).reshape(5, -1))  # [B, C]
  return jnp.tanh(0.7 * x + t) + c[:, None, None, :] * (1.0 + x ** 2)


def arrays():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal(SHAPE), jnp.float32)
  t = jnp.asarray([10, 500, 999], jnp.int32)
  uncond = jnp.zeros((3, 5), jnp.float32)
  cond = jnp.asarray(r.standard_normal((3, 5)), jnp.float32)
  return x, t, uncond, cond


def test_cfg_is_two_calls_combined_in_one_pass():
  x, t, uncond, cond = arrays()
  batches = []

  def recording(x2, t2, ctx):
    batches.append((x2.shape[0], np.asarray(ctx)))
    return net(x2, t2, ctx)

  guided = classifier_free_guidance(recording, 7.5)
  out = guided(x, t, (uncond, cond))
  assert len(batches) == 1 and batches[0][0] == 6  # one pass over 2B
  np.testing.assert_array_equal(batches[0][1][:3], np.asarray(uncond))  # uncond first
  e_u, e_c = net(x, t, uncond), net(x, t, cond)
  np.testing.assert_allclose(np.asarray(out), np.asarray(e_u + 7.5 * (e_c - e_u)), atol=1e-5)
  # scale 1 is the conditional output, scale 0 the unconditional one.
  np.testing.assert_allclose(np.asarray(classifier_free_guidance(net, 1.0)(x, t, (uncond, cond))),
                             np.asarray(e_c), atol=1e-6)
  # rescale=0 is plain CFG.
  np.testing.assert_array_equal(
      np.asarray(classifier_free_guidance(net, 7.5, rescale=0.0)(x, t, (uncond, cond))),
      np.asarray(classifier_free_guidance(net, 7.5)(x, t, (uncond, cond))))


def test_shared_cond_is_not_concatenated():
  x, t, uncond, cond = arrays()
  w = jnp.float32(0.3)

  def with_params(x2, t2, c):
    ctx, scale = c
    assert scale.shape == ()
    return net(x2, t2, ctx) * scale

  out = classifier_free_guidance(with_params, 3.0)(x, t, (uncond, cond, w))
  e_u, e_c = net(x, t, uncond) * w, net(x, t, cond) * w
  np.testing.assert_allclose(np.asarray(out), np.asarray(e_u + 3.0 * (e_c - e_u)), atol=1e-5)


@pytest.mark.parametrize('rescale', [0.0, 0.7, 1.0])
def test_rescale_matches_diffusers(rescale):
  x, t, uncond, cond = arrays()
  e_u, e_c = net(x, t, uncond), net(x, t, cond)
  plain = e_u + 5.0 * (e_c - e_u)
  ref = rescale_noise_cfg(torch.from_numpy(np.array(plain)), torch.from_numpy(np.array(e_c)),
                          guidance_rescale=rescale).numpy()
  out = classifier_free_guidance(net, 5.0, rescale=rescale)(x, t, (uncond, cond))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  if rescale == 1.0:  # the per-example std of the result is the conditional one
    np.testing.assert_allclose(np.asarray(jnp.std(out, axis=(1, 2, 3))),
                               np.asarray(jnp.std(e_c, axis=(1, 2, 3))), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(rescale_guidance(plain, e_c, rescale)), ref, atol=1e-5)


def test_guided_sampling_runs_with_v_models():
  """CFG is affine, so guiding a v network equals guiding the equivalent eps network."""
  schedule = Schedule.create('linear', 1000, 0.00085, 0.012)
  x, _, uncond, cond = arrays()

  def eps_net(x, t, ctx):
    return 0.9 * x + 0.1 * jnp.tanh(net(x, t, ctx))  # eps-like, so the chain stays O(1)

  def v_net(x, t, ctx):
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps = eps_net(x, t, ctx)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  run = lambda f, p: sample(classifier_free_guidance(f, 4.0), schedule, x, (uncond, cond),
                            jax.random.key(0), sampler='ddim', steps=4, parameterization=p)
  np.testing.assert_allclose(np.asarray(run(v_net, 'v')), np.asarray(run(eps_net, 'eps')),
                             atol=1e-4)


def test_combine_guidance_with_traced_scale():
  x, t, uncond, cond = arrays()
  e_u, e_c = net(x, t, uncond), net(x, t, cond)
  f = jax.jit(combine_guidance)
  for scale, rescale in ((3.0, 0.0), (6.0, 0.5)):
    ref = rescale_noise_cfg(torch.from_numpy(np.array(e_u + scale * (e_c - e_u))),
                            torch.from_numpy(np.array(e_c)), guidance_rescale=rescale).numpy()
    out = f(e_u, e_c, jnp.float32(scale), jnp.float32(rescale))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  assert f._cache_size() == 1  # pylint: disable=protected-access
