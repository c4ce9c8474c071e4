"""Scaled dot-product attention: one entry point, `attention`, for every platform.

The function is softmax(q k^T * scale) v with the softmax in float32, differentiated as flash
attention is: the backward pass keeps q, k, v, the output and each query's log-sum-exp, and
recomputes the softmax weights, instead of keeping [B, heads, Lq, Lk] weights between the passes.

What differs by platform (chosen at lowering, `platform.by_platform`) is the form that computes it:
  * TPU: the Pallas flash kernel (`accelerator_attention.tpu_forward` / `tpu_backward`), which
    never holds more than one [512, 512] block of logits, when traced under a mesh context
    (`jax.set_mesh`). Lengths are padded to multiples of 128 and padded keys masked; a mask is
    taken when it masks keys only. Without a mesh context, or with any other mask, TPU keeps
    the one-block einsum form below (rules in accelerator_attention).
  * GPU (CUDA, ROCm): `jax.nn.dot_product_attention`, the implementation left to JAX.
The einsum forms split the logits into blocks:
  * CPU: when the logits exceed CPU_ATTENTION_UNBLOCKED elements, the forward runs block by block
    inside a serial loop, each block holding at most CPU_ATTENTION_BLOCK logits, so they stay in
    cache; the backward always runs in blocks of at most CPU_ATTENTION_GRAD_BLOCK logits (it
    makes five passes over each block). A block is one or more (batch, head) pairs with all their
    queries, or a slice of one pair's queries; every query's softmax still spans all keys, so
    blocking changes only the loop order. Figures in benchmarks/README.md.
  * Every other platform, and TPU for the masks its kernel does not take: one block (a serial
    loop would idle the device).
Masked attention is never blocked. An explicit `block_budget` runs the einsum forms on every
platform, with that blocking.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ldm_jax.kernels import accelerator_attention, platform, vjp

CPU_ATTENTION_BLOCK = 2 ** 20
CPU_ATTENTION_UNBLOCKED = 2 ** 23
CPU_ATTENTION_GRAD_BLOCK = 2 ** 19

# Values of `attention(implementation=...)`: one platform's form wherever the program runs.
IMPLEMENTATIONS = ("cpu", "tpu", "gpu", "default")


class Blocks(NamedTuple):
  """(pairs per block, queries per block) for the forward and for the backward pass."""
  forward: tuple[int, int]
  backward: tuple[int, int]


class Plan(NamedTuple):
  """The static choices of one attention call."""
  cpu: Blocks  # the CPU form's blocking
  other: Blocks  # the one-block (or budgeted) einsum form's blocking, on every other platform
  tpu: bool  # the Pallas kernel on TPU, else the einsum form
  gpu: bool  # dot_product_attention on GPU, else the einsum form
  only: str | None  # one of IMPLEMENTATIONS wherever the program runs, or None (by platform)


def attention_blocks(pairs: int, lq: int, lk: int, budget: int | None) -> tuple[int, int]:
  """How to split `pairs` (batch x heads) [Lq, Lk] logit matrices into blocks of <= budget.

  Returns (pairs per block, queries per block), both divisors of their totals: as many whole
  pairs as fit, else one pair and the most queries that fit (one query per block if Lq has no
  fitting divisor). budget None means one block.
  """
  if budget is None or pairs * lq * lk <= budget:
    return pairs, lq
  if lq * lk <= budget:
    return max(g for g in range(1, pairs + 1) if pairs % g == 0 and g * lq * lk <= budget), lq
  fitting = [c for c in range(1, lq + 1) if lq % c == 0 and c * lk <= budget]
  return 1, max(fitting, default=1)


def cpu_forward_budget(logits: int) -> int | None:
  """The CPU forward's block budget for `logits` elements: None (one block) up to
  CPU_ATTENTION_UNBLOCKED, where the serial loop costs more than it saves; else
  CPU_ATTENTION_BLOCK (None when that is switched off)."""
  return None if logits <= CPU_ATTENTION_UNBLOCKED else CPU_ATTENTION_BLOCK


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              mask: jax.Array | None = None, block_budget: int | None | str = "auto",
              implementation: str | None = None) -> jax.Array:
  """Multi-head scaled dot-product attention with the softmax in float32.

  Args:
    q: [B, Lq, heads, d]; k, v: [B, Lk, heads, d].
    scale: multiplier of q.k (default d ** -0.5).
    mask: optional boolean, broadcastable to [B, heads, Lq, Lk]; True = attend.
    block_budget: largest logits block in elements, forward and backward, on every platform;
      "auto" (the default) blocks on CPU only, as the module docstring says; None never blocks.
      Anything but "auto" also keeps the TPU and GPU forms out.
    implementation: None (the default) picks the form by the platform the program is lowered
      for; one of IMPLEMENTATIONS runs that platform's form on any platform (tests run the TPU
      kernel in Pallas interpret mode and the GPU form on a CPU).
  Returns:
    [B, Lq, heads, d] in q's dtype.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: implementation={implementation!r}; expected None or one of "
                     f"{IMPLEMENTATIONS}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  b, lq, heads, d = q.shape
  lk = k.shape[1]
  pairs = b * heads
  whole = Blocks((pairs, lq), (pairs, lq))
  if mask is not None:
    cpu = other = whole
  elif block_budget == "auto":
    cpu = Blocks(attention_blocks(pairs, lq, lk, cpu_forward_budget(pairs * lq * lk)),
                 attention_blocks(pairs, lq, lk, CPU_ATTENTION_GRAD_BLOCK))
    other = whole
  else:
    blocks = attention_blocks(pairs, lq, lk, block_budget)
    cpu = other = Blocks(blocks, blocks)
  accelerated = block_budget == "auto"
  plan = Plan(cpu, other,
              tpu=accelerated and accelerator_attention.tpu_takes(
                  b, None if mask is None else jnp.shape(mask)),
              gpu=accelerated, only=implementation)
  if implementation in ("tpu", "gpu") and not getattr(plan, implementation):
    raise ValueError(f"attention: implementation={implementation!r} does not take "
                     f"block_budget={block_budget!r} with a mask of shape "
                     f"{None if mask is None else jnp.shape(mask)}, batch {b}; expected "
                     f"block_budget 'auto' and, for 'tpu', no mask or one broadcastable to "
                     f"[B, 1, 1, Lk], traced under a mesh context (jax.set_mesh) whose batch "
                     f"axes divide the batch")
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, L, d] each
  out = _attention(float(scale), plan, q, k, v, mask)  # [B, heads, Lq, d]
  return out.transpose(0, 2, 1, 3)  # [B, Lq, heads, d]


def _per_platform(plan, einsum_fn, tpu_fn, gpu_fn, *args):
  """The form `plan` picks for the platform: einsum_fn(plan.cpu, *args) on CPU, tpu_fn(*args)
  and gpu_fn(*args) where the plan allows them, einsum_fn(plan.other, *args) elsewhere."""
  forms = {"cpu": functools.partial(einsum_fn, plan.cpu),
           "default": functools.partial(einsum_fn, plan.other)}
  if plan.tpu:
    forms["tpu"] = tpu_fn
  if plan.gpu:
    forms["gpu"] = gpu_fn
  if plan.only is not None:
    return forms[plan.only](*args)
  if plan.cpu == plan.other:
    del forms["cpu"]  # one branch less to trace
  return platform.by_platform(*args, **forms)


def _logits(scale, qb, kb, mask_b):
  """[..., c, Lk] float32 logits of one block; scaling q touches [c, d], not [c, Lk]."""
  logits = jnp.einsum("...qd,...kd->...qk", qb * jnp.asarray(scale, qb.dtype), kb,
                      preferred_element_type=jnp.float32)
  if mask_b is not None:
    logits = jnp.where(mask_b, logits, jnp.finfo(jnp.float32).min)
  return logits


def _block_forward(scale, qb, kb, vb, mask_b):
  """softmax(q.k) @ v of one block, and each query's log-sum-exp [..., c] (float32).

  The division by the softmax total comes after the product with v: it then scales [c, d]
  instead of [c, Lk] elements (one pass less over the largest array).
  """
  logits = _logits(scale, qb, kb, mask_b)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)  # [..., c, Lk], unnormalised
  total = jnp.sum(weights, axis=-1, keepdims=True)  # [..., c, 1]
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(vb.dtype), vb,
                   preferred_element_type=jnp.float32)
  return (out / total).astype(vb.dtype), (peak + jnp.log(total))[..., 0]


def _block_backward(scale, qb, kb, vb, mask_b, ob, lse_b, dob):
  """Gradients of one block from recomputed softmax weights, in float32.

  Returns dq [..., c, d] and the transposed dk, dv [..., d, Lk]. The products that contract over
  queries are taken as x^T [d, c] @ [c, Lk], transposing the small [c, d] operand: XLA:CPU
  transposes the [c, Lk] operand of w^T @ dout (or contracts its major dimension) several times
  more slowly. ob None takes the softmax's row term from the weights instead of from the output,
  for a block computed in the same XLA computation as the forward pass (see below).
  """
  weights = jnp.exp(_logits(scale, qb, kb, mask_b) - lse_b[..., None])  # [..., c, Lk], softmax
  dvt = jnp.einsum("...dq,...qk->...dk", jnp.swapaxes(dob, -1, -2), weights.astype(dob.dtype),
                   preferred_element_type=jnp.float32)
  dweights = jnp.einsum("...qd,...kd->...qk", dob, vb, preferred_element_type=jnp.float32)
  # Softmax's Jacobian: dlogits = w * (dw - sum_k w dw), and sum_k w dw = dout . out per query.
  if ob is not None:
    row = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1, keepdims=True)
  else:
    # dout . out is the cheaper [c, d] form, but where the forward's out = w @ v is in the same
    # computation, XLA:CPU (jaxlib 0.10.2) fuses that dot, the product with dout and the sum
    # into one YNNPACK fusion, which is wrong in most rows when dout is a broadcast (a constant
    # cotangent); in plain jnp, with e [1024, 77], v [77, 40], w [40]:
    #   jax.jit(lambda e, v, w: e * jnp.sum(w * (e @ v), -1, keepdims=True))
    # (tests/kernels/test_attention_grad.py). Here the sum is over two [c, Lk] arrays instead;
    # for one block (<= CPU_ATTENTION_GRAD_BLOCK logits) that costs nothing measurable
    # (benchmarks/attention_row_term.py).
    row = jnp.sum(weights * dweights, axis=-1, keepdims=True)  # [..., c, 1]
  dlogits = weights * (dweights - row)
  if mask_b is not None:
    dlogits = jnp.where(mask_b, dlogits, 0)
  dlogits = dlogits.astype(qb.dtype)
  dq = jnp.einsum("...qk,...kd->...qd", dlogits, kb, preferred_element_type=jnp.float32) * scale
  dkt = jnp.einsum("...dq,...qk->...dk", jnp.swapaxes(qb * jnp.asarray(scale, qb.dtype), -1, -2),
                   dlogits, preferred_element_type=jnp.float32)
  return dq, dkt, dvt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(scale, plan, q, k, v, mask):
  """The output alone, when not differentiated: no form keeps residuals."""
  fwd = lambda blocks, *args: _forward(scale, blocks.forward, *args)[0]
  tpu = functools.partial(accelerator_attention.tpu_forward, scale, residual=False)
  gpu = functools.partial(accelerator_attention.gpu_forward, scale, residual=False)
  return _per_platform(plan, fwd, tpu, gpu, q, k, v, mask)


def _forward(scale, blocks, q, k, v, mask):
  """Output [B, heads, Lq, d] and log-sum-exp [B, heads, Lq] in `blocks` (pairs, queries) blocks."""
  b, heads, lq, d = q.shape
  lk = k.shape[2]
  group, chunk = blocks
  if group == b * heads and chunk == lq:
    return _block_forward(scale, q, k, v, mask)
  n_groups, n_chunks = b * heads // group, lq // chunk
  qs = q.reshape(n_groups, group, n_chunks, chunk, d)
  ks, vs = (x.reshape(n_groups, group, lk, d) for x in (k, v))

  def step(i):  # block i: pair group i // n_chunks, query chunk i % n_chunks
    g, c = i // n_chunks, i % n_chunks
    return _block_forward(scale, qs[g, :, c], ks[g], vs[g], None)

  out, lse = jax.lax.map(step, jnp.arange(n_groups * n_chunks))  # [blocks, group, chunk, ...]
  out = out.reshape(n_groups, n_chunks, group, chunk, d).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(n_groups, n_chunks, group, chunk).transpose(0, 2, 1, 3)
  return out.reshape(b, heads, lq, d), lse.reshape(b, heads, lq)


def _backward(scale, blocks, q, k, v, mask, out, lse, dout):
  """(dq, dk, dv) in `blocks` (pairs, queries) blocks, summing dk / dv over query chunks."""
  b, heads, lq, d = q.shape
  lk = k.shape[2]
  group, chunk = blocks
  if group == b * heads and chunk == lq:
    # One block: `out` may still be the forward's dot in this computation, so the row term comes
    # from the weights. Blocks inside the loops below read `out` as a loop operand.
    dq, dkt, dvt = _block_backward(scale, q, k, v, mask, None, lse, dout)
    grads = dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)
  else:
    n_groups, n_chunks = b * heads // group, lq // chunk
    per_query = [x.reshape(n_groups, group, n_chunks, chunk, *x.shape[3:])
                 for x in (q, out, lse, dout)]
    ks, vs = (x.reshape(n_groups, group, lk, d) for x in (k, v))

    def pair_group(xs):  # one group's gradients
      kg, vg, *per_query_g = xs  # [group, Lk, d] x 2, then [group, chunks, chunk, ...] each

      def chunk_step(carry, c):
        qc, oc, lse_c, doc = (x[:, c] for x in per_query_g)
        dq, dkt, dvt = _block_backward(scale, qc, kg, vg, None, oc, lse_c, doc)
        return (carry[0] + dkt, carry[1] + dvt), dq

      zeros = jnp.zeros((group, d, lk), jnp.float32)
      (dkt, dvt), dq = jax.lax.scan(chunk_step, (zeros, zeros), jnp.arange(n_chunks))
      return dq, jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)  # dq: [chunks, group, ...]

    dq, dk, dv = jax.lax.map(pair_group, (ks, vs, *per_query))
    dq = dq.transpose(0, 2, 1, 3, 4)  # [groups, group, chunks, chunk, d]
    grads = (dq.reshape(b, heads, lq, d), dk.reshape(b, heads, lk, d), dv.reshape(b, heads, lk, d))
  return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


def _attention_fwd(scale, plan, q, k, v, mask):
  fwd = lambda blocks, *args: _forward(scale, blocks.forward, *args)
  tpu = functools.partial(accelerator_attention.tpu_forward, scale)
  gpu = functools.partial(accelerator_attention.gpu_forward, scale)
  out, lse = _per_platform(plan, fwd, tpu, gpu, q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, plan, residuals, dout):
  q, k, v, mask, out, lse = residuals
  # Tied to the cotangent, or XLA:CPU merges the recomputed logits with the forward's and keeps
  # them alive between the passes.
  q, k = vjp.after_cotangent(dout, (q, k))
  bwd = lambda blocks, *args: _backward(scale, blocks.backward, *args)
  tpu = functools.partial(accelerator_attention.tpu_backward, scale)
  gpu = functools.partial(accelerator_attention.gpu_backward, scale)
  dq, dk, dv = _per_platform(plan, bwd, tpu, gpu, q, k, v, mask, out, lse, dout)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
