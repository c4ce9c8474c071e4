"""Jitted gradients of `kernels.attention` on CPU when the output's cotangent is a constant.

`jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * c))` with a constant c of shape [d] hands
the backward pass a broadcast cotangent, which XLA folds into the backward's fusions. The tests
compare dq, dk, dv with a float64 NumPy reference at the 77-key cross-attention shapes where
XLA:CPU (jaxlib 0.10) once produced wrong dq and dk, lengths around them, a blocked backward
(query chunks), and a cotangent passed as an argument. The last test pins the compiler fault that
the backward's form avoids, in plain jnp, so that a jaxlib that fixes it shows.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import kernels, xla_cpu
from ldm_jax.kernels import flash_attention

SCALE = 0.3


def _reference_grads(q, k, v, dout):
  """(dq, dk, dv) of sum(softmax(SCALE q.k) v * dout) in float64; [B, L, heads, d] arrays."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  dout = np.broadcast_to(np.asarray(dout, np.float64), q.shape)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)  # [B, heads, Lq, Lk]
  dweights = np.einsum("bqhd,bkhd->bhqk", dout, v)
  dlogits = weights * (dweights - (weights * dweights).sum(-1, keepdims=True)) * SCALE
  dq = np.einsum("bhqk,bkhd->bqhd", dlogits, k)
  dk = np.einsum("bhqk,bqhd->bkhd", dlogits, q)
  dv = np.einsum("bhqk,bqhd->bkhd", weights, dout)
  return dq, dk, dv


def _inputs(b, lq, lk, heads, d, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, lq, heads, d)).astype(np.float32)
  k, v = (rng.standard_normal((b, lk, heads, d)).astype(np.float32) for _ in range(2))
  return q, k, v


def _assert_close(grads, reference):
  for name, got, want in zip("qkv", grads, reference):
    got = np.asarray(got, np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"d{name}: max error {err:.3g} of its largest entry (expected < 1e-4)"


# (B, Lq, Lk, heads, d), one block each: the reported shape first, then lengths and widths around
# it.
CONSTANT_COTANGENT_SHAPES = [
    (1, 1024, 77, 1, 40),
    (1, 512, 77, 1, 40),
    (1, 768, 77, 1, 40),
    (1, 1024, 64, 1, 40),
    (1, 1024, 77, 1, 64),
    (2, 1024, 77, 2, 40),
    (1, 256, 77, 1, 40),
    (1, 64, 64, 1, 40),
]


@pytest.mark.parametrize("shape", CONSTANT_COTANGENT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_jit_grad_with_constant_cotangent(shape):
  b, lq, lk, heads, d = shape
  q, k, v = _inputs(*shape)
  cotangent = np.cos(np.arange(d)).astype(np.float32)  # [d], folded into the program
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v, scale=SCALE) * cotangent)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _assert_close(grads, _reference_grads(q, k, v, cotangent))


# Logits over CPU_ATTENTION_GRAD_BLOCK: the backward runs in blocks of (batch, head) pairs or in
# query chunks, and reads the forward's output as a loop operand.
BLOCKED_SHAPES = [
    (4, 1024, 77, 2, 40),  # pair groups
    (1, 1024, 1024, 1, 40),  # query chunks
    (2, 2048, 512, 1, 40),  # query chunks, two pairs
]


@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_jit_grad_with_constant_cotangent_blocked_backward(shape):
  b, lq, lk, heads, _ = shape
  assert b * heads * lq * lk > flash_attention.CPU_ATTENTION_GRAD_BLOCK
  q, k, v = _inputs(*shape)
  cotangent = np.cos(np.arange(shape[-1])).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v, scale=SCALE) * cotangent)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _assert_close(grads, _reference_grads(q, k, v, cotangent))


def test_jit_grad_with_cotangent_argument():
  # A training loss's cotangent reaches attention as a computed array, not a constant.
  shape = (1, 1024, 77, 1, 40)
  q, k, v = _inputs(*shape)
  dout = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
  loss = lambda q, k, v, dout: jnp.sum(kernels.attention(q, k, v, scale=SCALE) * dout)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, dout)
  _assert_close(grads, _reference_grads(q, k, v, dout))


def _broadcast_reduce_error():
  """Relative error of jit(e * sum(w * (e @ v), -1)), the form the backward no longer uses."""
  rng = np.random.default_rng(0)
  e = rng.random((1024, 77)).astype(np.float32)  # [Lq, Lk]
  v = rng.standard_normal((77, 40)).astype(np.float32)  # [Lk, d]
  w = rng.standard_normal(40).astype(np.float32)  # [d], broadcast over queries
  got = jax.jit(lambda e, v, w: e * jnp.sum(w * (e @ v), -1, keepdims=True))(e, v, w)
  e64 = e.astype(np.float64)
  want = e64 * (w * (e64 @ v)).sum(-1, keepdims=True)
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fault")
def test_xla_cpu_broadcast_reduce_fusion_fault():
  """The XLA:CPU fault the backward's form avoids, without ldm_jax code.

  A dot's output times a broadcast, reduced and broadcast back, compiles into one YNNPACK fusion
  that is wrong in over half the rows on jaxlib 0.10.2 (LIBRARY_FUSION_TYPE_REDUCE in
  --xla_cpu_experimental_ynn_fusion_type; right without it). This test fails when a jaxlib computes
  it correctly: then the fault is gone and the backward may use the cheaper dout . out again.
  """
  if not jax.__version__.startswith("0.10."):
    pytest.skip(f"the fault was seen on jax/jaxlib 0.10; this is {jax.__version__}")
  flags = os.environ.get("XLA_FLAGS", "")
  if xla_cpu.YNN_FUSION_FLAG in flags and "LIBRARY_FUSION_TYPE_REDUCE" not in flags:
    pytest.skip(f"XLA_FLAGS={flags!r} keeps reductions out of YNNPACK fusions")
  err = _broadcast_reduce_error()
  assert err > 1e-2, (f"jit(e * sum(w * (e @ v))) is now right (error {err:.3g}): the XLA:CPU fault "
                      f"is fixed in jax {jax.__version__}")
