"""Attention on accelerators: the TPU Pallas flash kernel and GPU `jax.nn.dot_product_attention`.

Each form is a forward `(q, k, v, mask) -> (out, lse)` (or `out` alone, outside differentiation)
and a backward `(q, k, v, mask, out, lse, dout) -> (dq, dk, dv)` over [B, heads, L, d] arrays, the
same contract as the einsum forms in `flash_attention`, so that one custom VJP holds every
platform's form and keeps the same residuals between the passes on all of them.
`flash_attention.attention` picks the form by platform; nothing here looks at the platform.

TPU (`tpu_forward`, `tpu_backward`): the kernels of the Pallas op
`jax.experimental.pallas.ops.tpu.flash_attention` (a forward; a dk/dv and a dq backward). Its public
`flash_attention` carries its own VJP with residuals of its own; its kernels are called directly
instead so that the backward reads the log-sum-exp the forward kept (passed as the running maximum m
= lse with the running total l = 1, which gives the kernel's p = exp(s - m) / l = softmax). The
kernels tile both sequences in blocks of a multiple of 128 (`TPU_BLOCKS`), so:
  * a length that is not a multiple of 128 (77 text tokens, 8x8 = 64 latent pixels) is padded
    with zeros to the next multiple; padded queries are cut from the outputs, padded keys get
    segment id 0 against every query's 1, so they get zero weight (`mask_value`, e^-huge);
  * a mask is taken when it masks keys only (broadcastable to [B, 1, 1, Lk], e.g. text padding):
    it becomes the keys' segment ids. Any other mask (per query or per head, as a causal mask) is
    not the kernel's to take (`tpu_takes` is False) and `flash_attention` keeps its one-block
    einsum form for it. A query whose keys are all masked gets an unspecified output.
The kernels read the head dimension whole (any d: 40, 64, 160 ...).

XLA cannot partition a Pallas call ("Mosaic kernels cannot be automatically partitioned"), and
`custom_partitioning` does not reach the TPU compiler (an open JAX bug, its callbacks never
run there), so the kernels run
under `shard_map` over the mesh of the trace's mesh context (`jax.set_mesh(mesh)`, or
`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` as `python -m ldm_jax.aot` uses, around
tracing), each chip on its share of the batch split over
`parallel.BATCH_AXES`, all heads and positions. Without a mesh context a program may still be
partitioned, and nothing at trace time says so: the kernel is then not used (`tpu_takes` is
False), nor for a batch that the batch axes do not divide.

GPU (`gpu_forward`, `gpu_backward`): `jax.nn.dot_product_attention` with the implementation left
to JAX (`implementation=None`; jax 0.10 then uses its XLA form). Naming "cudnn" would fail to trace
on a host without CUDA, and every platform's form is traced wherever the program is built. The
backward is dot_product_attention's own VJP, which recomputes the forward; it does not read lse.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import PartitionSpec

from ldm_jax import parallel

# Sequence block sizes tried in order for the Pallas kernels: the largest that divides the padded
# length. All are multiples of the kernels' 128-lane minimum.
TPU_BLOCKS = (512, 256, 128)
TPU_LANES = 128

# Segment ids of attended and of masked (or padded) keys; every query has TPU_ATTEND.
TPU_ATTEND, TPU_IGNORE = 1, 0


def tpu_takes(batch: int, mask_shape: tuple[int, ...] | None) -> bool:
  """Whether the Pallas kernel takes this call, traced here: a mesh context whose batch axes
  divide `batch`, and no mask or a keys-only one (broadcastable to [B, 1, 1, Lk])."""
  if _batch_split(batch) is None:
    return False
  if mask_shape is None:
    return True
  full = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)  # [B?, heads?, Lq?, Lk]
  return len(full) == 4 and full[1] == 1 and full[2] == 1


def _padded(length: int) -> int:
  return -(-length // TPU_LANES) * TPU_LANES


def _block(padded: int) -> int:
  return next(b for b in TPU_BLOCKS if padded % b == 0)


def _pad_to(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
  if x.shape[axis] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _tpu_inputs(q, k, v, mask):
  """q, k, v padded to multiples of 128 along L, and the segment ids (None when no key is
  masked or padded)."""
  b, _, lq, _ = q.shape
  lk = k.shape[2]
  lq_pad, lk_pad = _padded(lq), _padded(lk)
  q = _pad_to(q, 2, lq_pad)  # [B, heads, Lq', d]
  k, v = (_pad_to(x, 2, lk_pad) for x in (k, v))  # [B, heads, Lk', d]
  if mask is None and lk_pad == lk:
    return q, k, v, None
  if mask is None:
    keys = jnp.full((b, lk), TPU_ATTEND, jnp.int32)
  else:
    full = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B or 1, 1, 1, Lk or 1]
    attended = jnp.broadcast_to(full[:, 0, 0, :], (b, lk))  # [B, Lk]
    keys = jnp.where(attended, TPU_ATTEND, TPU_IGNORE).astype(jnp.int32)
  keys = _pad_to(keys, 1, lk_pad, TPU_IGNORE)  # [B, Lk']
  queries = jnp.full((b, lq_pad), TPU_ATTEND, jnp.int32)  # [B, Lq']
  return q, k, v, pallas_flash.SegmentIds(q=queries, kv=keys)


def _batch_split(batch: int) -> tuple[str, ...] | None:
  """The axes of the trace's mesh that split the batch for the kernel (parallel.BATCH_AXES
  present in it, () when none is), or None when the kernel cannot run here: no mesh context, or
  a batch that those axes do not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in axes)
  return axes if batch % shards == 0 else None


def _over_batch(body, arrays, num_outputs):
  """body(*arrays) on every device's share of the batch (the leading dimension of every array
  and result; None entries pass through), under shard_map over the trace's mesh."""
  axes = _batch_split(next(a for a in arrays if a is not None).shape[0])
  assert axes is not None, "tpu_takes admits no such call"
  spec = PartitionSpec(axes if axes else None)
  present = [i for i, a in enumerate(arrays) if a is not None]

  def local(*given):
    args = [None] * len(arrays)
    for i, a in zip(present, given):
      args[i] = a
    return body(*args)

  out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
  return jax.shard_map(local, in_specs=(spec,) * len(present), out_specs=out_specs,
                       check_vma=False)(*(arrays[i] for i in present))


def tpu_forward(scale, q, k, v, mask, residual=True):
  """Output [B, heads, Lq, d] and log-sum-exp [B, heads, Lq] (float32) from the Pallas kernel;
  the output alone when not `residual` (the kernel then keeps no per-query statistics, which
  it writes 128 lanes wide)."""
  lq = q.shape[2]
  qp, kp, vp, segments = _tpu_inputs(q, k, v, mask)
  block_q, block_k = _block(qp.shape[2]), _block(kp.shape[2])

  def kernel(q, k, v, queries, keys):
    segment_ids = None if queries is None else pallas_flash.SegmentIds(q=queries, kv=keys)
    result = pallas_flash._flash_attention_impl(  # pylint: disable=protected-access
        q, k, v, None, segment_ids, residual, False, scale, 1, block_q, block_k, block_k, False)
    return tuple(result) if residual else result

  queries, keys = (None, None) if segments is None else segments
  result = _over_batch(kernel, (qp, kp, vp, queries, keys), 3 if residual else 1)
  if not residual:
    return result[:, :, :lq]
  out, total, peak = result
  lse = peak + jnp.log(total)  # [B, heads, Lq']
  return out[:, :, :lq], lse[:, :, :lq]


def tpu_backward(scale, q, k, v, mask, out, lse, dout):
  """(dq, dk, dv) from the Pallas backward kernels, reading the forward's log-sum-exp."""
  lq, lk = q.shape[2], k.shape[2]
  qp, kp, vp, segments = _tpu_inputs(q, k, v, mask)
  lq_pad = qp.shape[2]
  block_q, block_k = _block(lq_pad), _block(kp.shape[2])
  # Padded queries are zeros with a zero cotangent: their logits are 0, so lse 0 keeps their
  # weights finite, and they add nothing to dk, dv.
  lse = _pad_to(lse, 2, lq_pad)  # [B, heads, Lq']
  dout = _pad_to(dout, 2, lq_pad)  # [B, heads, Lq', d]
  row = jnp.sum(dout.astype(jnp.float32) * _pad_to(out, 2, lq_pad).astype(jnp.float32),
                axis=-1)  # [B, heads, Lq'], sum_k w dw per query
  total = jnp.ones_like(lse)
  shared = dict(sm_scale=scale, causal=False, mask_value=pallas_flash.DEFAULT_MASK_VALUE,
                debug=False)

  def kernels(q, k, v, queries, keys, total, lse, dout, row):
    segment_ids = None if queries is None else pallas_flash.SegmentIds(q=queries, kv=keys)
    dk, dv = pallas_flash._flash_attention_bwd_dkv(  # pylint: disable=protected-access
        q, k, v, None, segment_ids, total, lse, dout, row, block_q_major=block_q,
        block_q=block_q, block_k_major=block_k, block_k=block_k, **shared)
    dq, _ = pallas_flash._flash_attention_bwd_dq(  # pylint: disable=protected-access
        q, k, v, None, segment_ids, total, lse, dout, row, block_q_major=block_q,
        block_k_major=block_k, block_k=block_k, **shared)
    return dq, dk, dv

  queries, keys = (None, None) if segments is None else segments
  dq, dk, dv = _over_batch(kernels, (qp, kp, vp, queries, keys, total, lse, dout, row), 3)
  grads = dq[:, :, :lq], dk[:, :, :lk], dv[:, :, :lk]
  return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


def _dot_product_attention(scale, q, k, v, mask, residual):
  """jax.nn.dot_product_attention over [B, heads, L, d] arrays (it takes [B, L, heads, d])."""
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B?, heads?, Lq?, Lk]
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, L, heads, d]
  result = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=None,
                                        return_residual=residual)
  if not residual:
    return result.transpose(0, 2, 1, 3)
  out, lse = result  # [B, Lq, heads, d], [B, Lq, heads]
  return out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1).astype(jnp.float32)


def gpu_forward(scale, q, k, v, mask, residual=True):
  """Output [B, heads, Lq, d] and log-sum-exp [B, heads, Lq] from dot_product_attention; the
  output alone when not `residual`."""
  return _dot_product_attention(scale, q, k, v, mask, residual)


def gpu_backward(scale, q, k, v, mask, out, lse, dout):
  """(dq, dk, dv) from dot_product_attention's VJP (out and lse unused: it recomputes)."""
  del out, lse
  _, pullback = jax.vjp(lambda q, k, v: _dot_product_attention(scale, q, k, v, mask, False),
                        q, k, v)
  return pullback(dout)
