"""Train state (params, EMA, optimizer state, rng) and the LitEma update.

The state is one `flax.struct.dataclass`, so it is a pytree that jit, the
sharding helpers in `ldm_jax.parallel` and Orbax all take as is.

EMA follows CompVis `LitEma` exactly: its counter is incremented *before*
the decay is computed, so the n-th update (n = 1, 2, ...) uses
  decay_n = min(decay, (1 + n) / (10 + n))      (warmup=True)
  shadow <- shadow - (1 - decay_n) * (shadow - param).
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to resume bit-exactly.

  Attributes:
    step: int32 scalar, number of train steps taken (skipped ones included).
    params: parameter pytree (plain nested dicts).
    ema_params: EMA shadow of `params`, or None when EMA is off.
    opt_state: optax state for `params`.
    rng: raw uint32 [2] PRNG key; the step splits it every call.
    ema_num_updates: int32 scalar, LitEma's `num_updates` (EMA updates done).
    skipped_steps: int32 scalar, steps whose update was dropped because the
      loss or gradients were non-finite.
  """
  step: jax.Array
  params: Any
  ema_params: Optional[Any]
  opt_state: Any
  rng: jax.Array
  ema_num_updates: jax.Array
  skipped_steps: jax.Array


def ema_decay_at(num_updates: jax.Array, decay: float = 0.9999,
                 warmup: bool = True) -> jax.Array:
  """LitEma decay for the `num_updates`-th update (1-based), fp32 scalar."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, num_updates: jax.Array,
               decay: float = 0.9999, warmup: bool = True) -> Any:
  """One LitEma step: shadow -= (1 - decay_n) * (shadow - param).

  Args:
    ema: shadow pytree.
    params: current parameters, same structure as `ema`.
    num_updates: 1-based index of this update (LitEma's counter after its
      increment), so the first update uses decay 2/11 with warmup.
    decay: the maximum decay.
    warmup: use the (1+n)/(10+n) ramp; False uses `decay` throughout.

  Returns:
    The new shadow, in the shadow's dtype (the arithmetic is fp32).
  """
  one_minus = 1.0 - ema_decay_at(num_updates, decay, warmup)

  def one(s, p):
    s32 = s.astype(jnp.float32)
    return (s32 - one_minus * (s32 - p.astype(jnp.float32))).astype(s.dtype)

  return jax.tree.map(one, ema, params)


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array, *, use_ema: bool = True) -> TrainState:
  """Fresh state at step 0; the EMA starts as a copy of `params` (as LitEma).

  Suitable as the `init_fn` of `ldm_jax.parallel.init_sharded` when wrapped
  with the model's init, so every field is born sharded.
  """
  # Separate buffers, so the EMA and the params can both be donated.
  ema = jax.tree.map(jnp.copy, params) if use_ema else None
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=ema,
      opt_state=optimizer.init(params),
      rng=jnp.asarray(rng),
      ema_num_updates=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32))
