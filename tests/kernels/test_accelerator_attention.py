"""The TPU and GPU forms of `kernels.attention`, run on this CPU host.

The TPU form (the Pallas flash kernel) runs in Pallas interpret mode and the GPU form
(`jax.nn.dot_product_attention`, its XLA implementation here) on the CPU, both through the same
`kernels.attention` code path as on their platforms (`implementation=` names the form), against
an independent float64 NumPy attention: outputs and the gradients of q, k and v, at lengths that
are not multiples of the kernel's 128-wide blocks (77 text tokens, 8x8 and 64x64 latent pixels),
with a key-padding mask, in float32 and bfloat16. Then the TPU program: compiled for a v5e
topology it holds the Pallas kernel, and its temporaries are a fraction of the one-block einsum's.
The TPU form runs under a mesh context (`jax.set_mesh`), as the module docstring says.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ldm_jax import kernels
from ldm_jax.kernels import accelerator_attention


def _mesh(devices):
  return jax.set_mesh(Mesh(np.array(devices), ("data",)))


def _reference(q, k, v, scale, mask, dout):
  """Output and (dq, dk, dv) of softmax(scale q.k) v in float64; [B, L, heads, d] arrays."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  logits = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)  # [B, heads, Lq, Lk]
  out = np.einsum("bhqk,bkhd->bqhd", weights, v)
  dweights = np.einsum("bqhd,bkhd->bhqk", dout, v)
  dlogits = weights * (dweights - np.sum(dweights * weights, -1, keepdims=True))
  dq = scale * np.einsum("bhqk,bkhd->bqhd", dlogits, k)
  dk = scale * np.einsum("bhqk,bqhd->bkhd", dlogits, q)
  dv = np.einsum("bhqk,bqhd->bkhd", weights, dout)
  return out, (dq, dk, dv)


def _run(implementation, q, k, v, scale, mask, dout):
  """Output and (dq, dk, dv) of kernels.attention in that form, jitted like a model's call."""
  def loss(q, k, v, mask, dout):
    out = kernels.attention(q, k, v, scale=scale, mask=mask, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) * dout), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, mask, dout)
  return out, grads


def _inputs(b, lq, lk, heads, d, dtype, masked, seed=0):
  rs = np.random.RandomState(seed)
  q = jnp.asarray(rs.randn(b, lq, heads, d), dtype)
  k, v = (jnp.asarray(rs.randn(b, lk, heads, d), dtype) for _ in range(2))
  dout = jnp.asarray(rs.randn(b, lq, heads, d), jnp.float32)  # random: every gradient term counts
  mask = None
  if masked:  # text padding: batch element i attends to its first lk - 5 (i + 1) keys
    valid = lk - 5 * (np.arange(b) + 1)
    mask = jnp.asarray(np.arange(lk)[None, None, None, :] < valid[:, None, None, None])
  return q, k, v, mask, dout


def _assert_close(got, want, rtol):
  """|got - want| within rtol of want's largest magnitude (gradients sum over many terms)."""
  got, want = np.asarray(got, np.float64), np.asarray(want)
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want)), np.max(np.abs(got - want))


CASES = {  # name: (B, Lq, Lk, heads, d, dtype, key-padding mask)
    "8x8 pixels, 77 text tokens": (2, 64, 77, 2, 8, jnp.float32, False),
    "self-attention, 8x8 pixels": (2, 64, 64, 2, 16, jnp.float32, False),
    "77 keys with padding mask": (2, 64, 77, 2, 8, jnp.float32, True),
    "64x64 pixels, 77 text tokens": (1, 4096, 77, 1, 8, jnp.float32, False),
    "bfloat16, 300 keys": (1, 200, 300, 2, 40, jnp.bfloat16, False),
}


@pytest.mark.parametrize("implementation", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_accelerator_forms_match_the_reference(case, implementation):
  b, lq, lk, heads, d, dtype, masked = CASES[case]
  q, k, v, mask, dout = _inputs(b, lq, lk, heads, d, dtype, masked)
  scale = 0.7 * d ** -0.5
  # The Pallas kernel runs on the CPU; neither context changes the GPU form.
  with pltpu.force_tpu_interpret_mode(), _mesh(jax.devices()[:1]):
    out, grads = _run(implementation, q, k, v, scale, mask, dout)
  want_out, want_grads = _reference(q, k, v, scale, mask, dout)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  _assert_close(out, want_out, rtol)
  for got, want in zip(grads, want_grads):  # dq, dk, dv
    _assert_close(got, want, rtol)


def test_padded_keys_get_no_weight():
  """A masked key changes nothing, whatever its value; an attended one does."""
  q, k, v, mask, _ = _inputs(2, 64, 77, 1, 8, jnp.float32, True)
  assert bool(mask[0, 0, 0, 70]) and not bool(mask[1, 0, 0, 70])
  v_changed = v.at[:, 70].set(1e3)
  with pltpu.force_tpu_interpret_mode(), _mesh(jax.devices()[:1]):
    run = jax.jit(lambda v: kernels.attention(q, k, v, mask=mask, implementation="tpu"))
    out, out_changed = run(v), run(v_changed)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(out_changed[1]))
  assert not np.allclose(np.asarray(out[0]), np.asarray(out_changed[0]))  # element 0 attends it


def test_tpu_takes_key_masks_under_a_mesh_only():
  assert not accelerator_attention.tpu_takes(2, None)  # no mesh context
  with _mesh(jax.devices()[:1]):
    assert accelerator_attention.tpu_takes(2, None)
    assert accelerator_attention.tpu_takes(2, (2, 1, 1, 77))
    assert accelerator_attention.tpu_takes(2, (77,))
    assert not accelerator_attention.tpu_takes(2, (77, 77))  # causal text mask: per query
    assert not accelerator_attention.tpu_takes(2, (2, 8, 1, 77))  # per head
    causal = jnp.tril(jnp.ones((8, 8), bool))
    q = jnp.ones((1, 8, 1, 4), jnp.float32)
    with pytest.raises(ValueError, match="implementation='tpu'.*shape \\(8, 8\\)"):
      kernels.attention(q, q, q, mask=causal, implementation="tpu")
  with pytest.raises(ValueError, match="implementation='fpga'"):
    kernels.attention(q, q, q, implementation="fpga")


def _tpu_program(fn, args, device):
  """fn compiled for one TPU device, traced under a one-device mesh context."""
  sds = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))
         for a in args]
  with _mesh([device]):
    return jax.jit(fn).lower(*sds).compile()


def test_tpu_program_runs_the_pallas_kernel_in_less_memory(tpu_v5e_devices):
  """A UNet self-attention at 512 px (64x64 latents: 4096 x 4096 logits per head), bf16, its
  gradient compiled for a TPU v5e chip: the Pallas kernel replaces the one-block einsum, which
  would hold [heads, 4096, 4096] logits and weights; the kernel's temporaries are a fraction."""
  q = jnp.ones((1, 4096, 8, 40), jnp.bfloat16)  # [B, 64x64, heads, d] as SD1.5's first level

  def grad(block_budget):
    loss = lambda q, k, v: jnp.sum(
        kernels.attention(q, k, v, block_budget=block_budget).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))

  pallas = _tpu_program(grad("auto"), [q, q, q], tpu_v5e_devices[0])
  einsum = _tpu_program(grad(None), [q, q, q], tpu_v5e_devices[0])  # one block, no kernel
  assert "tpu_custom_call" in pallas.as_text()
  assert "tpu_custom_call" not in einsum.as_text()
  pallas_temp = pallas.memory_analysis().temp_size_in_bytes
  einsum_temp = einsum.memory_analysis().temp_size_in_bytes
  logits = 8 * 4096 * 4096 * 4  # one head-batch of float32 logits: 512 MiB
  assert einsum_temp >= logits
  assert pallas_temp < logits / 8 and pallas_temp < einsum_temp / 16, (pallas_temp, einsum_temp)


def test_tpu_program_keeps_the_einsum_for_other_masks(tpu_v5e_devices):
  """A causal mask (CLIP's text attention) is not the kernel's: the TPU program has no kernel;
  a key-padding mask is."""
  q = jnp.ones((2, 77, 4, 16), jnp.float32)
  causal = jnp.tril(jnp.ones((77, 77), bool))
  padding = jnp.ones((2, 1, 1, 77), bool)
  text = lambda mask: _tpu_program(lambda q: kernels.attention(q, q, q, mask=mask), [q],
                                   tpu_v5e_devices[0]).as_text()
  assert "tpu_custom_call" not in text(causal)
  assert "tpu_custom_call" in text(padding)


def test_tpu_program_splits_the_kernel_over_the_batch(tpu_v5e_devices):
  """On 4 chips with the batch sharded, each chip runs the kernel on its examples (no
  all-gather of q, k or v); without a mesh context the program keeps the einsum form."""
  mesh = Mesh(np.array(tpu_v5e_devices), ("data",))
  batch = NamedSharding(mesh, PartitionSpec("data"))
  q = jax.ShapeDtypeStruct((8, 256, 4, 32), jnp.bfloat16, sharding=batch)
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v).astype(jnp.float32) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(batch,) * 3)
  with jax.set_mesh(mesh):
    text = grad.lower(q, q, q).compile().as_text()
  assert text.count("tpu_custom_call") >= 3  # forward, dk/dv and dq kernels
  assert "all-gather" not in text
  assert "tpu_custom_call" not in grad.lower(q, q, q).compile().as_text()
