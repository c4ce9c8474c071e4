"""Helpers for the custom VJPs of this package and of `models/remat.py`."""

from typing import Any

import jax
import jax.numpy as jnp


def after_cotangent(ct: Any, tree: Any) -> Any:
  """tree, with each floating leaf made data-dependent on the cotangent ct (values unchanged).

  For custom VJPs that recompute from saved inputs: XLA could otherwise merge the recomputation
  with the forward pass's copy (XLA:CPU expands `jax.checkpoint`'s barriers before its CSE), which
  then stays alive until the backward pass. No compiler pass removes a data dependency.
  """
  first = jax.tree_util.tree_leaves(ct)[0]
  zero = first.ravel()[0] * 0  # a scalar; XLA does not fold x * 0 for floats (NaN semantics)

  def tie(a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    return a + zero.astype(a.dtype)
  return jax.tree_util.tree_map(tie, tree)
