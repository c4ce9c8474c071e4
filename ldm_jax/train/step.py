"""The generic train step: grads, optimizer, EMA, non-finite guard.

Any model plugs in through one function,

  loss_fn(params, batch, rng) -> (scalar loss, {name: scalar metric}),

and `make_train_step` returns a pure `(state, batch) -> (state, metrics)`
jitted once with explicit in/out shardings and the state donated, so XLA
updates parameters and optimizer state in place. Frozen inputs that are not
trained (the base model under LoRA adapters) can follow the batch as further
step arguments, handed to `loss_fn(params, batch, rng, *frozen)`.

Non-finite losses or gradients never reach the parameters: the step keeps
the previous params, optimizer state and EMA and reports `nonfinite = 1`.
With nonfinite='skip' the step is counted in `state.skipped_steps` and the
run goes on; with 'stop' the host loop calls `check_finite`, which raises.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import parallel
from ldm_jax.train import state as state_lib

LossFn = Callable[[Any, Any, jax.Array], Tuple[jax.Array, Dict[str, Any]]]
NONFINITE_MODES = ('stop', 'skip')


class NonFiniteError(FloatingPointError):
  """The loss or the gradients were NaN/inf at a given step."""


def check_finite(metrics: Dict[str, Any], step: int) -> None:
  """Raises NonFiniteError naming `step` when metrics['nonfinite'] is set.

  Call it on the host with the metrics of step `step` (ideally one step late,
  so the host never waits on the device).
  """
  flag = int(np.asarray(jax.device_get(metrics['nonfinite'])))
  if flag:
    loss = float(np.asarray(jax.device_get(metrics['loss'])))
    gnorm = float(np.asarray(jax.device_get(metrics['grad_norm'])))
    raise NonFiniteError(
        f'non-finite training values at step {step}: loss={loss}, '
        f'grad_norm={gnorm}; parameters were left at their step-{step} values.'
        " Lower the learning rate, enable clipping, or use nonfinite='skip'.")


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old`, leaf by leaf: the non-finite guard of both stages.

  With the old state donated the select happens in place, so a bad step leaves
  params, moments and EMA exactly as they were and NaNs never reach them.
  """
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def apply_gradients(optimizer: optax.GradientTransformation, grads: Any,
                    opt_state: Any, params: Any) -> Tuple[Any, Any]:
  """(new params, new optimizer state) after one call of `optimizer`.

  An accumulating optimizer (`optim.accumulate`) returns zero updates on all
  but every k-th call, so the params only change then.
  """
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def optimizer_updates(micro_steps: jax.Array, grad_accum_steps: int) -> jax.Array:
  """How many optimizer updates `micro_steps` train steps have made."""
  return micro_steps // grad_accum_steps


def _cast_floats(tree: Any, dtype: Any) -> Any:
  def one(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(one, tree)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    *, ema_decay: Optional[float] = 0.9999,
                    ema_warmup: bool = True, nonfinite: str = 'stop',
                    learning_rate_fn: Optional[Callable[..., Any]] = None,
                    grad_accum_steps: int = 1, mesh: Optional[Any] = None,
                    state_shardings: Optional[Any] = None,
                    batch_sharding: Optional[Any] = None, donate: bool = True,
                    compute_dtype: Optional[Any] = None,
                    frozen_shardings: Optional[Tuple[Any, ...]] = None) -> Callable:
  """Builds the jitted `(state, batch) -> (state, metrics)`.

  Args:
    loss_fn: `(params, batch, rng) -> (loss, metrics)`; fp32 scalar loss.
    optimizer: optax transformation whose state is `state.opt_state`.
    ema_decay: LitEma maximum decay; None disables the EMA update (the state
      must then have `ema_params=None` or keep them frozen).
    ema_warmup: use LitEma's (1+n)/(10+n) ramp.
    nonfinite: 'stop' or 'skip' (see module docstring).
    learning_rate_fn: schedule to report as metrics['lr'], evaluated at the
      optimizer's update count `(step - skipped_steps) // grad_accum_steps`.
    grad_accum_steps: the accumulation of `optimizer` (only for that count).
    mesh: device mesh; gives the default batch sharding and replicated
      metrics. Requires `state_shardings`.
    state_shardings: TrainState of NamedShardings (e.g.
      `jax.tree.map(lambda x: x.sharding, state)`).
    batch_sharding: sharding (or tree prefix of them) for the batch; default
      `parallel.batch_sharding(mesh)`.
    donate: donate the incoming state's buffers.
    compute_dtype: if set (e.g. jnp.bfloat16), floating params are cast to it
      for the forward/backward pass; the fp32 master params get fp32 grads.
    frozen_shardings: shardings of further step arguments, which the step
      passes on to `loss_fn(params, batch, rng, *frozen)` untouched (e.g. the
      frozen base that LoRA adapters add to: an argument, not a constant
      baked into the program, and not part of the state or its checkpoint).

  Returns:
    The jitted step. metrics: loss, grad_norm (before clipping), lr,
    nonfinite (int32 0/1), skipped_steps, plus everything `loss_fn` returned.
  """
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f'nonfinite={nonfinite!r}: expected one of '
                     f'{NONFINITE_MODES}')
  if mesh is not None and state_shardings is None:
    raise ValueError('make_train_step: mesh is set but state_shardings is '
                     'None; pass jax.tree.map(lambda x: x.sharding, state)')

  def forward(params, batch, rng, *frozen):
    if compute_dtype is not None:
      params = _cast_floats(params, compute_dtype)
    loss, metrics = loss_fn(params, batch, rng, *frozen)
    return loss.astype(jnp.float32), metrics

  def step_fn(state: state_lib.TrainState, batch: Any, *frozen: Any):
    rng, step_rng = jax.random.split(state.rng)
    (loss, aux), grads = jax.value_and_grad(forward, has_aux=True)(
        state.params, batch, step_rng, *frozen)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    params, opt_state = apply_gradients(optimizer, grads, state.opt_state,
                                        state.params)
    ema, ema_n = state.ema_params, state.ema_num_updates
    if ema_decay is not None and ema is not None:
      ema_n = ema_n + 1
      ema = state_lib.ema_update(ema, params, ema_n, ema_decay, ema_warmup)

    keep = lambda new, old: keep_if_finite(ok, new, old)
    skipped = state.skipped_steps + (1 - ok.astype(jnp.int32))
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=None if ema is None else keep(ema, state.ema_params),
        ema_num_updates=jnp.where(ok, ema_n, state.ema_num_updates),
        rng=rng,
        skipped_steps=skipped if nonfinite == 'skip' else state.skipped_steps)

    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   nonfinite=1 - ok.astype(jnp.int32),
                   skipped_steps=new_state.skipped_steps)
    if learning_rate_fn is not None:
      opt_steps = optimizer_updates(state.step - state.skipped_steps,
                                    grad_accum_steps)
      metrics['lr'] = jnp.asarray(learning_rate_fn(opt_steps), jnp.float32)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if state_shardings is None and batch_sharding is None:
    return jax.jit(step_fn, donate_argnums=donate_argnums)
  if batch_sharding is None:
    batch_sharding = parallel.batch_sharding(mesh)
  if mesh is None:
    mesh = jax.tree.leaves(state_shardings)[0].mesh
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, batch_sharding) +
                 tuple(frozen_shardings or ()),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=donate_argnums)


def make_config_step(loss_fn: LossFn, config: Any, optimizer: optax.GradientTransformation,
                     learning_rate_fn: Optional[Callable[..., Any]], mesh: Optional[Any],
                     state_shardings: Optional[Any], **kwargs) -> Callable:
  """`make_train_step` with a run config's EMA, non-finite policy and gradient accumulation
  (config.train); kwargs go to `make_train_step` as they are."""
  train = config.train
  return make_train_step(loss_fn, optimizer,
                         ema_decay=train.ema_decay if train.use_ema else None,
                         nonfinite=train.nonfinite, learning_rate_fn=learning_rate_fn,
                         grad_accum_steps=train.grad_accum_steps, mesh=mesh,
                         state_shardings=state_shardings, **kwargs)


def compile_step(train_step: Callable, state: Any, batch: Any,
                 *args: Any) -> Tuple[Any, Dict[str, float]]:
  """Ahead-of-time compiles the step; returns (compiled, cost figures).

  `state`, `batch` and any further arguments of the step (`args`) may be
  concrete arrays or ShapeDtypeStructs (with shardings). Calling the jitted
  step afterwards with arguments of the same shapes and shardings reuses this
  compilation. The figures are per device, from XLA: argument/output/temp/
  generated-code bytes of `memory_analysis()` and flops/bytes accessed of
  `cost_analysis()` (absent keys where the backend does not report them).
  """
  compiled = train_step.lower(state, batch, *args).compile()
  info: Dict[str, float] = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes',
                 'alias_size_in_bytes'):
      if hasattr(mem, name):
        info[name] = float(getattr(mem, name))
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  if cost:
    for name in ('flops', 'bytes accessed'):
      if name in cost:
        info[name.replace(' ', '_')] = float(cost[name])
  return compiled, info
