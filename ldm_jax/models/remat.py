"""Rematerialised blocks: keep a block's inputs, recompute its activations in the backward pass.

`recompute(fn, module, *args)` returns `fn(module, *args)`. Under differentiation only the block's
inputs (and its parameters, which stay alive anyway) are kept between the forward and the backward
pass; the block runs again in the backward pass to produce the activations its gradient needs.

The block gets a custom VJP whose backward recomputes from inputs made data-dependent on the
incoming cotangent (`kernels.after_cotangent`). `jax.checkpoint` (nn.remat) relies on
optimization barriers instead, and XLA:CPU expands those before its common-subexpression
elimination, which then merges the recomputation back into the forward pass: the step keeps every
activation, as without remat. A data dependency survives every compiler pass, so the same
implementation serves every platform (tests/models/test_remat.py compares the compiled memory on
CPU and for a TPU topology).

Dropout makes the recomputation depend on the rng stream; stochastic calls (`deterministic=False`)
use `nn.remat`, which replays the rng correctly.
"""

from typing import Any, Callable

import flax.linen as nn
import jax

from ldm_jax import kernels


def _recompute(fn: Callable[..., Any], module: nn.Module, *args):
  detached = module.clone(parent=None)  # the same block, to apply as a pure function

  def apply(params, *a):
    return fn(detached.bind({"params": params}), *a)

  def forward(mdl, *a):
    return fn(mdl, *a), (mdl.variables["params"], a)

  def backward(residuals, ct):
    params, a = residuals
    params, a = kernels.after_cotangent(ct, (params, a))
    _, vjp = jax.vjp(apply, params, *a)
    params_ct, *args_ct = vjp(ct)
    return ({"params": params_ct}, *args_ct)

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)(module, *args)


def recompute(fn: Callable[..., Any], module: nn.Module, *args, deterministic: bool = True):
  """fn(module, *args) with module's activations recomputed in the backward pass.

  fn is called with the (lifted) module and the array arguments; Python values such as flags
  belong in its closure. The block's variables must all be in the "params" collection.
  """
  if deterministic:
    return _recompute(fn, module, *args)
  return nn.remat(fn)(module, *args)
