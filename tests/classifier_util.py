"""Test helper: a tiny unconditional shapes LDM (random weights) and a tiny noisy-latent classifier
for it, the pair classifier guidance works on. Nothing is trained here; the classifier task's
tests train the classifier, the sampling tests guide with random or fitted weights.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from configs import shapes_classifier
from ldm_jax import ldm as ldm_lib
from ldm_jax import networks
from ldm_jax.models import classifier as classifier_lib


def uncond_model_config() -> ml_collections.ConfigDict:
  """An unconditional LDM on the tiny shapes autoencoder's 8x8x4 latents, with the latent space
  (first stage, schedule, size) of configs/shapes_classifier.py:tiny."""
  clf = shapes_classifier.get_config("tiny")
  return ml_collections.ConfigDict(dict(
      first_stage=clf.model.first_stage.to_dict(),
      unet=common.unet_kwargs(in_channels=4, model_channels=32, channel_mult=(1, 2),
                              num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32),
      diffusion=clf.model.diffusion.to_dict()))


def random_params(template, seed: int):
  """Parameters of a template's shapes, drawn on the host (no init to compile): LeCun-normal
  kernels and embeddings, unit scales, zero biases. Any network will do for these tests."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if "bias" in name:
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, template)


def uncond_model(seed: int = 0) -> ldm_lib.LatentDiffusion:
  cfg = uncond_model_config()
  template = jax.eval_shape(lambda rng: networks.init_params(cfg, rng), jax.random.PRNGKey(0))
  return ldm_lib.LatentDiffusion(cfg, random_params(template, seed))


def classifier_module(**overrides) -> classifier_lib.EncoderUNet:
  """The EncoderUNet of configs/shapes_classifier.py:tiny (fields replaced by `overrides`)."""
  kwargs = shapes_classifier.get_config("tiny").model.classifier.to_dict()
  kwargs.update(overrides)
  for key in ("attention_resolutions", "channel_mult"):
    kwargs[key] = tuple(kwargs[key])
  return classifier_lib.EncoderUNet(**kwargs)


def classifier_params(module: classifier_lib.EncoderUNet, seed: int = 0):
  size = module.image_size or 8
  x = jnp.zeros((1, size, size, module.in_channels), jnp.float32)
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))
  return random_params(template["params"], seed)
