"""Optimizers and learning-rate schedules.

LDM trains every diffusion model with torch `AdamW(lr)` (betas 0.9/0.999,
eps 1e-8, weight decay 0.01 on all parameters) and scales the base learning
rate by the global batch size (`lr = accumulate * n_gpus * batch * base_lr`);
its autoencoders and their discriminator use `Adam(lr, betas=(0.5, 0.9))`.
`make_optimizer` builds the former (optionally with warmup, decay, global
norm clipping), `make_gan_optimizer` the latter; both accumulate gradients
through `accumulate`, which defines what `train.grad_accum_steps` means.

optax's AdamW multiplies the decay by the learning rate, as torch does, so
the two agree step for step (tested against torch.optim.AdamW).
"""

from typing import Callable, Optional

import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'cosine', 'linear')


def scale_lr_by_batch(base_lr: float, global_batch: int,
                      grad_accum_steps: int = 1) -> float:
  """LDM's rule: lr = base_lr * global batch (* accumulation steps).

  `global_batch` is the number of examples in one step across all devices;
  with gradient accumulation the effective batch is `grad_accum_steps` times
  larger, and LDM scales by that too.
  """
  if global_batch < 1 or grad_accum_steps < 1:
    raise ValueError(
        f'scale_lr_by_batch: global_batch={global_batch} and '
        f'grad_accum_steps={grad_accum_steps} must both be >= 1')
  return float(base_lr) * int(global_batch) * int(grad_accum_steps)


def learning_rate_fn(*, learning_rate: float, warmup_steps: int = 0,
                     schedule: str = 'constant',
                     total_steps: Optional[int] = None,
                     end_lr_factor: float = 0.0) -> Callable[..., jnp.ndarray]:
  """Schedule step -> learning rate (an optax schedule; also for logging).

  Linear warmup from 0 to `learning_rate` over `warmup_steps` (step 0 has
  lr 0, as in big_vision), then
    constant: learning_rate;
    cosine:   end + (lr - end) * (1 + cos(pi * p)) / 2;
    linear:   lr + (end - lr) * p;
  with p = (step - warmup) / (total - warmup) clipped to [0, 1] and
  end = end_lr_factor * learning_rate. `step` counts optimizer updates (with
  accumulation, one per `grad_accum_steps` micro-steps).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule={schedule!r}: expected one of {SCHEDULES}')
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps={warmup_steps}: expected >= 0')
  if schedule != 'constant' and (total_steps is None
                                 or total_steps <= warmup_steps):
    raise ValueError(
        f'schedule={schedule!r} needs total_steps > warmup_steps, got '
        f'total_steps={total_steps}, warmup_steps={warmup_steps}')
  lr = float(learning_rate)
  end = float(end_lr_factor) * lr

  def fn(step):
    s = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, s / warmup_steps) if warmup_steps else 1.0
    if schedule == 'constant':
      return lr * warm
    p = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    if schedule == 'cosine':
      decayed = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    else:
      decayed = lr + (end - lr) * p
    return decayed * warm

  return fn


def make_optimizer(*, learning_rate: float, warmup_steps: int = 0,
                   schedule: str = 'constant',
                   total_steps: Optional[int] = None,
                   end_lr_factor: float = 0.0, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip_norm: Optional[float] = None,
                   grad_accum_steps: int = 1) -> optax.GradientTransformation:
  """AdamW with schedule, optional global-norm clipping and accumulation.

  Defaults are torch.optim.AdamW's, which LDM uses. With
  `grad_accum_steps = k > 1` the update is `optax.MultiSteps`: gradients of k
  consecutive calls are averaged and the parameters change on every k-th
  call only (the others return zero updates), so k micro-batches of size b
  equal one step on a batch of k * b. Clipping applies to the averaged
  gradient. Pass `learning_rate` already scaled (see `scale_lr_by_batch`).
  """
  if grad_clip_norm is not None and grad_clip_norm <= 0:
    raise ValueError(f'grad_clip_norm={grad_clip_norm}: expected > 0 or None')
  lr = learning_rate_fn(learning_rate=learning_rate, warmup_steps=warmup_steps,
                        schedule=schedule, total_steps=total_steps,
                        end_lr_factor=end_lr_factor)
  parts = []
  if grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay))
  return accumulate(optax.chain(*parts), grad_accum_steps)


def accumulate(tx: optax.GradientTransformation,
               grad_accum_steps: int) -> optax.GradientTransformation:
  """`tx` applied once per `grad_accum_steps` calls, to their averaged gradients.

  The other calls return zero updates (the parameters stay bit-identical), so
  with k micro-batches of size b the k-th call makes the update of one call on
  the k * b examples. Every optimizer of both stages goes through here, so a
  train step means one micro-batch everywhere. k = 1 returns `tx` itself (and
  its state keeps the structure of checkpoints written without accumulation).
  """
  if grad_accum_steps < 1:
    raise ValueError(f'grad_accum_steps={grad_accum_steps}: expected >= 1')
  if grad_accum_steps == 1:
    return tx
  return optax.MultiSteps(
      tx, every_k_schedule=grad_accum_steps).gradient_transformation()


def make_gan_optimizer(*, learning_rate: float, b1: float = 0.5,
                       b2: float = 0.9, eps: float = 1e-8,
                       grad_clip_norm: Optional[float] = None,
                       grad_accum_steps: int = 1
                       ) -> optax.GradientTransformation:
  """Adam(betas 0.5, 0.9), LDM's optimizer for autoencoder and discriminator.

  With `grad_accum_steps > 1` it accumulates as `make_optimizer` does.
  """
  parts = []
  if grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
  return accumulate(optax.chain(*parts), grad_accum_steps)
