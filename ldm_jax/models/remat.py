"""Rematerialised blocks: keep a block's inputs, recompute its activations in the backward pass.

`recompute(fn, module, *args)` returns `fn(module, *args)`. Under differentiation only the block's
inputs (and its parameters, which stay alive anyway) are kept between the forward and the backward
pass; the block runs again in the backward pass to produce the activations its gradient needs.

On GPU and TPU this is Flax's `nn.remat` (`jax.checkpoint`), whose optimization barriers keep XLA
from merging the recomputation back into the forward pass. XLA:CPU expands those barriers before
its common-subexpression elimination, which then merges the two copies: the step keeps every
activation, as without remat (the benchmark UNet's train step at batch 8: 1329 MiB of XLA temp
with nn.remat, 1307 MiB without). On CPU the block therefore gets a custom VJP whose backward
recomputes from inputs that depend on the incoming cotangent (plus `0 * ct[0]`), a data dependency
no pass removes, so the recomputation can be neither merged with the forward nor hoisted before
the cotangent exists.

Dropout makes the recomputation depend on the rng stream; stochastic calls (`deterministic=False`)
use `nn.remat` on every backend, which replays the rng correctly.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def after_cotangent(ct: Any, tree: Any) -> Any:
  """tree, with each floating leaf made data-dependent on the cotangent ct (values unchanged).

  For custom VJPs that recompute from saved inputs: on XLA:CPU the recomputation could otherwise
  be merged with the forward pass's copy, which then stays alive until the backward pass.
  """
  first = jax.tree_util.tree_leaves(ct)[0]
  zero = first.ravel()[0] * 0  # a scalar; XLA does not fold x * 0 for floats (NaN semantics)

  def tie(a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    return a + zero.astype(a.dtype)
  return jax.tree_util.tree_map(tie, tree)


def _recompute_on_cpu(fn: Callable[..., Any], module: nn.Module, *args):
  detached = module.clone(parent=None)  # the same block, to apply as a pure function

  def apply(params, *a):
    return fn(detached.bind({"params": params}), *a)

  def forward(mdl, *a):
    return fn(mdl, *a), (mdl.variables["params"], a)

  def backward(residuals, ct):
    params, a = residuals
    params, a = after_cotangent(ct, (params, a))
    _, vjp = jax.vjp(apply, params, *a)
    params_ct, *args_ct = vjp(ct)
    return ({"params": params_ct}, *args_ct)

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(module, *args)


def recompute(fn: Callable[..., Any], module: nn.Module, *args, deterministic: bool = True):
  """fn(module, *args) with module's activations recomputed in the backward pass.

  fn is called with the (lifted) module and the array arguments; Python values such as flags
  belong in its closure. The block's variables must all be in the "params" collection.
  """
  if jax.default_backend() == "cpu" and deterministic:
    return _recompute_on_cpu(fn, module, *args)
  return nn.remat(fn)(module, *args)
