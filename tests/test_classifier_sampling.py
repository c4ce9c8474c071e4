"""Classifier guidance inside `LatentDiffusion.sample`'s compiled loop (ldm_jax.sampling).

A tiny unconditional shapes LDM and a tiny noisy-latent classifier, both with random weights: the
guidance's direction is then known (up the classifier's log-probability of the target), so
  * scale 0 reproduces the unguided samples of the same seeds (the plumbing adds nothing else);
  * guided samples score a higher log p(target | z) under the classifier than the unguided ones
    from the same noise, every sample, with ddim, plms and ddpm;
  * new labels and scales reuse the compiled loop;
  * samplers, latents, labels and classifiers that cannot work are refused before sampling.
The end-to-end experiment (trained LDM + trained classifier, the shapes detector's hit rates) is
benchmarks/classifier_guidance.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import classifier_util
from configs import shapes_ldm_class
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.diffusion import samplers as samplers_lib

LABELS = [0, 5, 11, 17]
SEEDS = [10, 11, 12, 13]
SCALE = 10.0
STEPS = 4


@pytest.fixture(scope="module")
def model():
  return classifier_util.uncond_model()


@pytest.fixture(scope="module")
def classifier():
  """Random weights, the head's output projection scaled up: with LeCun-normal weights the logits
  are nearly equal (log p ~ log 1/18 everywhere); these spread, so the gradient has a direction."""
  module = classifier_util.classifier_module()
  params = classifier_util.classifier_params(module, seed=1)
  head = params["out_2"]["c_proj"]
  params["out_2"]["c_proj"] = dict(head, kernel=head["kernel"] * 10.0)
  return sampling.NoisyClassifier(module, params, source="test")


def _target_log_p(classifier, z, labels):
  """log p(label | z, t = 0) [B] under the classifier."""
  logits = classifier.module.apply({"params": classifier.params}, jnp.asarray(z),
                                   jnp.zeros((len(z),), jnp.int32))
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return np.asarray(log_p)[np.arange(len(z)), labels]


def _assert_gains(before, after):
  """log p(target) rose by more than 1 nat on average, and by more than 0.5 for 3 of the 4
  samples. (A sample that already scores high gains little: in 4 steps from t = 751, a random
  classifier's gradient at high noise need not lead where it is read, at t = 0.)"""
  gain = after - before
  assert np.mean(gain) > 1.0 and np.sum(gain > 0.5) >= 3, (before, after)


def _latents(model, sampler, **kwargs):
  return sampling.sample(model, seeds=SEEDS, sampler=sampler, steps=STEPS, decode=False, **kwargs)


def test_scale_zero_is_unguided_and_guidance_raises_the_target_log_prob(model, classifier):
  unguided = _latents(model, "ddim", num_samples=len(SEEDS))
  zero = _latents(model, "ddim", labels=LABELS, classifier=classifier, classifier_scale=0.0)
  guided = _latents(model, "ddim", labels=LABELS, classifier=classifier, classifier_scale=SCALE)
  np.testing.assert_allclose(zero, unguided, atol=1e-5)
  _assert_gains(_target_log_p(classifier, unguided, LABELS),
                _target_log_p(classifier, guided, LABELS))
  # New labels and scales are traced values: the compiled loop is reused, and the samples move
  # towards their new targets.
  compiled = samplers_lib._sample_jit._cache_size()
  other = LABELS[::-1]
  again = _latents(model, "ddim", labels=other, classifier=classifier, classifier_scale=SCALE / 2)
  assert samplers_lib._sample_jit._cache_size() == compiled
  gain = _target_log_p(classifier, again, other) - _target_log_p(classifier, unguided, other)
  assert gain.mean() > 0.5, gain


@pytest.mark.parametrize("sampler", ["plms", "ddpm"])
def test_plms_and_ddpm_are_guided_too(model, classifier, sampler):
  """Against scale 0 of the same compiled loop (which is the unguided sampler, as ddim shows)."""
  zero = _latents(model, sampler, labels=LABELS, classifier=classifier, classifier_scale=0.0)
  guided = _latents(model, sampler, labels=LABELS, classifier=classifier,
                    classifier_scale=SCALE)
  _assert_gains(_target_log_p(classifier, zero, LABELS),
                _target_log_p(classifier, guided, LABELS))


@pytest.mark.parametrize("case,kwargs,message", [
    ("sampler", dict(sampler="euler_ancestral"),
     r"'euler_ancestral'.*classifier guidance runs with ddim, plms, ddpm"),
    ("no labels", dict(labels=None, num_samples=2), r"without labels"),
    ("label range", dict(labels=[3, 18]), r"class label 18 .*expected 0 <= label < 18"),
    ("latent size", dict(height=64, width=64), r"takes 8x8 latents .* this sample's are 16x16"),
])
def test_refusals_name_the_mismatch(model, classifier, case, kwargs, message):
  call = dict(labels=[1, 2], sampler="ddim", steps=2, decode=False, classifier=classifier)
  call.update(kwargs)
  with pytest.raises(sampling.SamplingInputError, match=message):
    sampling.sample(model, **call)


def test_refuses_other_latents_scales_and_schedules(model, classifier):
  wrong = classifier_util.classifier_module(in_channels=3)
  other = dataclasses.replace(classifier, module=wrong)
  with pytest.raises(sampling.SamplingInputError, match=r"reads 3-channel latents; this model's "
                                                        r"have 4"):
    sampling.sample(model, labels=[1], steps=2, decode=False, classifier=other)
  schedule = {k: model.config.diffusion[k] for k in sampling.SCHEDULE_FIELDS}
  latent = dict(channels=4, image_size=8, scale_factor=0.5, schedule=schedule)
  with pytest.raises(sampling.SamplingInputError, match=r"scaled by 0.5; this model's "
                                                        r"scale_factor is 1"):
    sampling.sample(model, labels=[1], steps=2, decode=False,
                    classifier=dataclasses.replace(classifier, latent=latent))
  latent = dict(latent, scale_factor=1.0, schedule=dict(schedule, timesteps=500))
  with pytest.raises(sampling.SamplingInputError, match=r"diffusion.timesteps=500; this model "
                                                        r"has 1000"):
    sampling.sample(model, labels=[1], steps=2, decode=False,
                    classifier=dataclasses.replace(classifier, latent=latent))


def test_class_model_refuses_a_classifier_of_other_classes():
  cfg = ml_collections.ConfigDict(shapes_ldm_class.get_config("tiny").model.to_dict())
  class_model = ldm_lib.LatentDiffusion(cfg, {})  # Refused before any parameter is read.
  module = classifier_util.classifier_module(num_classes=10)
  ten = sampling.NoisyClassifier(module, None, source="ten")
  with pytest.raises(sampling.SamplingInputError, match=r"classifier ten has 10 classes; this "
                                                        r"model has 19 class labels"):
    sampling.sample(class_model, labels=[1], steps=2, decode=False, classifier=ten)
