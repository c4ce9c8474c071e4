"""Conditioning keys: the one list, the UNet input routing of each key, the null class label."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import ldm as ldm_lib
from ldm_jax.models import conditioning as C


def _cond():
  return C.Conditioning(context=jnp.ones((2, 3, 5)), concat=jnp.full((2, 4, 4, 1), 7.0),
                        y=jnp.array([1, 2]))


# key -> (channels of x, context given, y given), as the CompVis DiffusionWrapper routes them.
ROUTES = {None: (4, False, False), "concat": (5, False, False), "crossattn": (4, True, False),
          "hybrid": (5, True, False), "adm": (4, False, True), "hybrid-adm": (5, True, True)}


@pytest.mark.parametrize("key", list(ROUTES))
def test_unet_inputs_route_each_key(key):
  z = jnp.zeros((2, 4, 4, 4))
  x, context, y = C.unet_inputs(key, z, _cond())
  channels, has_context, has_y = ROUTES[key]
  assert x.shape == (2, 4, 4, channels)
  if channels == 5:  # The condition is appended after the latent channels.
    np.testing.assert_array_equal(np.asarray(x[..., 4]), 7.0)
  assert (context is not None) == has_context and (y is not None) == has_y


def test_the_keys_are_listed_once_and_checked():
  assert set(ROUTES) == set(C.CONDITIONING_KEYS)
  C.check_conditioning_key("hybrid")
  with pytest.raises(ValueError, match=r"model.diffusion.conditioning_key='cross'; expected one"):
    C.check_conditioning_key("cross")
  # The model module uses the same objects, not copies.
  assert ldm_lib.Conditioning is C.Conditioning


def test_conditioning_is_a_pytree():
  leaves = jax.tree_util.tree_leaves(C.Conditioning(context=jnp.ones(2), y=jnp.zeros(1)))
  assert len(leaves) == 2  # None fields are no leaves


def test_null_label_is_the_last_class():
  assert C.null_label(1001) == 1000
  assert C.ClassEmbedder(n_classes=11, embed_dim=4).null_label == 10
