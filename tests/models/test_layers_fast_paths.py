"""The CPU fast paths of `kernels` and `layers` against torch: blocked attention, im2col convs,
norms.

Blocking only reorders the attention loop (each query row still takes its softmax over every key),
so outputs and gradients must equal torch's scaled_dot_product_attention at fp32 round-off, for
one block, blocks of whole (batch, head) pairs, query chunks of one pair and a query length with no
divisor that fits the budget. `layers.conv` on maps smaller than its kernel (computed as im2col +
matmul) must equal torch's conv2d, `layers.GroupNorm` torch's GroupNorm, and `layers.LayerNorm`
torch's layer_norm (values and gradients, through its memory-lean VJP).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax import kernels
from ldm_jax.kernels import activations, norm, upsample, vjp
from ldm_jax.kernels import flash_attention as attn_kernel
from ldm_jax.models import attention, layers


def _torch_attention(q, k, v, scale):
  """[B, L, h, d] numpy -> torch SDPA over [B, h, L, d], back to [B, Lq, h, d]."""
  tq, tk, tv = (torch.from_numpy(np.asarray(a)).permute(0, 2, 1, 3) for a in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
  return out.permute(0, 2, 1, 3).numpy()


@pytest.mark.parametrize("lq, lk, budget, blocks", [
    (64, 48, None, (6, 64)),       # no blocking at all (2 x 3 = 6 (batch, head) pairs)
    (64, 48, 2 * 64 * 48, (2, 64)),  # 3 blocks of 2 whole pairs
    (64, 48, 64 * 48, (1, 64)),    # 6 blocks of 1 pair
    (63, 40, 2000, (1, 21)),       # 18 blocks: one pair, 21 of its 63 queries (63 = 3 x 21)
    (13, 40, 200, (1, 1)),         # prime length that does not fit: one query per block
])
def test_blocked_attention_matches_torch(lq, lk, budget, blocks):
  assert attn_kernel.attention_blocks(2 * 3, lq, lk, budget) == blocks
  rs = np.random.RandomState(lq)
  q = rs.randn(2, lq, 3, 8).astype(np.float32)
  k, v = (rs.randn(2, lk, 3, 8).astype(np.float32) for _ in range(2))
  got = jax.jit(lambda q, k, v: kernels.attention(q, k, v, scale=0.3, block_budget=budget))(
      q, k, v)
  want = _torch_attention(q, k, v, 0.3)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_blocked_attention_gradients_match_torch():
  rs = np.random.RandomState(0)
  q = rs.randn(2, 32, 2, 8).astype(np.float32)
  k, v = (rs.randn(2, 24, 2, 8).astype(np.float32) for _ in range(2))
  w = rs.randn(2, 32, 2, 8).astype(np.float32)  # a random cotangent
  budget = 8 * 24  # 4 query chunks of each of the 4 (batch, head) pairs
  assert attn_kernel.attention_blocks(2 * 2, 32, 24, budget) == (1, 8)
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v, block_budget=budget) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).requires_grad_() for a in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  (out.permute(0, 2, 1, 3) * torch.from_numpy(w)).sum().backward()
  for got, ref in zip(grads, (tq, tk, tv)):
    np.testing.assert_allclose(np.asarray(got), ref.grad.permute(0, 2, 1, 3).numpy(), atol=1e-5,
                               rtol=1e-4)


def test_cpu_budget_blocks_only_when_large():
  # The benchmark UNet's 32x32 level: 1024 tokens, 8 heads, batch 2 -> one pair per block on CPU.
  budget = attn_kernel.cpu_forward_budget(2 * 8 * 1024 * 1024)
  assert budget == attn_kernel.CPU_ATTENTION_BLOCK
  assert attn_kernel.attention_blocks(2 * 8, 1024, 1024, budget) == (1, 1024)
  # Its cross-attention (1024 tokens over 77) at batch 8 is computed in one piece.
  assert attn_kernel.cpu_forward_budget(8 * 8 * 1024 * 77) is None
  assert attn_kernel.attention_blocks(8 * 8, 1024, 77, None) == (64, 1024)
  # A masked call is never blocked, and still matches the unblocked result.
  rs = np.random.RandomState(1)
  q = rs.randn(1, 16, 1, 4).astype(np.float32)
  mask = np.tril(np.ones((16, 16), bool))
  a = kernels.attention(q, q, q, mask=mask, block_budget=16)
  b = kernels.attention(q, q, q, mask=mask, block_budget=None)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _torch_attention_grads(q, k, v, cot, scale=None, mask=None):
  """torch SDPA's output and (dq, dk, dv) under the cotangent cot, all [B, L, h, d] numpy."""
  tq, tk, tv = (torch.from_numpy(np.asarray(a, np.float32)).permute(0, 2, 1, 3).requires_grad_()
                for a in (q, k, v))
  tmask = None if mask is None else torch.from_numpy(np.asarray(mask))
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, scale=scale)
  (out.permute(0, 2, 1, 3) * torch.from_numpy(cot)).sum().backward()
  return (out.detach().permute(0, 2, 1, 3).numpy(),
          [t.grad.permute(0, 2, 1, 3).numpy() for t in (tq, tk, tv)])


@pytest.mark.parametrize("grad_budget, blocks", [
    (None, (4, 20)),     # everything in one block
    (2 * 20 * 24, (2, 20)),  # 2 blocks of 2 whole (batch, head) pairs
    (5 * 24, (1, 5)),    # 16 blocks: one pair, 5 of its 20 queries; dk / dv summed over 4 chunks
])
def test_attention_backward_blocks_match_torch(monkeypatch, grad_budget, blocks):
  """The custom VJP's backward, in whichever blocks CPU_ATTENTION_GRAD_BLOCK makes (the forward
  pass is one block here), gives torch's gradients."""
  monkeypatch.setattr(attn_kernel, "CPU_ATTENTION_GRAD_BLOCK", grad_budget)
  assert attn_kernel.attention_blocks(2 * 2, 20, 24, grad_budget) == blocks
  rs = np.random.RandomState(3)
  q = rs.randn(2, 20, 2, 8).astype(np.float32)
  k, v = (rs.randn(2, 24, 2, 8).astype(np.float32) for _ in range(2))
  cot = rs.randn(2, 20, 2, 8).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v, scale=0.4) * cot)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _, want = _torch_attention_grads(q, k, v, cot, scale=0.4)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-4)


def test_masked_attention_gradients_match_torch():
  """A causal mask (as the text transformer's) and a per-batch key-padding mask: outputs and
  gradients equal torch's; masked-out keys get no gradient."""
  rs = np.random.RandomState(4)
  q, k, v, cot = (rs.randn(2, 12, 3, 8).astype(np.float32) for _ in range(4))
  causal = np.tril(np.ones((12, 12), bool))
  padding = np.ones((2, 1, 1, 12), bool)
  padding[1, ..., 9:] = False  # the second sequence's last three keys are padding
  for mask in (causal, padding):
    loss = lambda q, k, v, mask=mask: jnp.sum(kernels.attention(q, k, v, mask=mask) * cot)
    got = kernels.attention(q, k, v, mask=mask)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    want, want_grads = _torch_attention_grads(q, k, v, cot, mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
    for g, ref in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(g), ref, atol=1e-5, rtol=1e-4)
  assert not np.any(np.asarray(grads[1])[1, 9:]) and not np.any(np.asarray(grads[2])[1, 9:])


def test_attention_gradients_in_bfloat16():
  """bf16 q, k, v: gradients come back in bf16 and near the float32 ones (softmax stays fp32)."""
  rs = np.random.RandomState(5)
  q, k, v, cot = (rs.randn(1, 16, 2, 8).astype(np.float32) for _ in range(4))
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v).astype(jnp.float32) * cot)
  half = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  _, want = _torch_attention_grads(q, k, v, cot)
  for g, ref in zip(half, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), ref, atol=0.1, rtol=0.05)


def test_attention_gradient_keeps_no_softmax_weights():
  """What the backward pass keeps (the leaves of jax.vjp's closure) is q, k, v, the output and
  the log-sum-exp, never the [B, heads, Lq, Lk] softmax weights that JAX's own derivative keeps;
  and the backward's own blocks keep its XLA temp memory below one such array."""
  rs = np.random.RandomState(6)
  q, k, v = (jnp.asarray(rs.randn(2, 512, 4, 8).astype(np.float32)) for _ in range(3))
  weights_mib = 2 * 4 * 512 * 512 * 4 / 2 ** 20  # 8 MiB
  kept_mib = lambda fn: sum(x.nbytes for x in jax.tree.leaves(jax.vjp(fn, q, k, v)[1])) / 2 ** 20

  def plain(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * 8 ** -0.5, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
  assert kept_mib(plain) >= weights_mib  # what the test guards against
  for budget in ("auto", None, 2 ** 14):
    assert kept_mib(functools.partial(kernels.attention, block_budget=budget)) < weights_mib / 4

  # "auto" on CPU: the forward in one block (8 MiB of logits), the backward in blocks of
  # CPU_ATTENTION_GRAD_BLOCK logits (2 MiB).
  assert attn_kernel.cpu_forward_budget(2 * 4 * 512 * 512) is None
  vjp_fn = jax.vjp(kernels.attention, q, k, v)[1]  # a pytree: its residuals are the leaves
  compiled = jax.jit(lambda f, ct: f(ct)).lower(vjp_fn, q).compile()
  assert compiled.memory_analysis().temp_size_in_bytes / 2 ** 20 < weights_mib  # 16 unblocked


@pytest.mark.parametrize("size, kernel, pad", [(2, 3, 1), (1, 3, 1), (5, 3, 1), (3, 4, 1)])
def test_conv_matches_torch_including_maps_smaller_than_the_kernel(size, kernel, pad):
  """layers.conv (im2col when the kernel exceeds the map) against torch.nn.functional.conv2d."""
  rs = np.random.RandomState(size)
  x = rs.randn(2, size, size, 6).astype(np.float32)
  module = layers.conv(5, kernel, padding=pad, dtype=jnp.float32, param_dtype=jnp.float32)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
  w = rs.randn(*params["kernel"].shape).astype(np.float32)  # [kh, kw, Cin, F]
  bias = rs.randn(5).astype(np.float32)
  got = module.apply({"params": {"kernel": w, "bias": bias}}, x)
  want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                    torch.from_numpy(w).permute(3, 2, 0, 1),
                                    torch.from_numpy(bias), padding=pad)
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("shape, groups, eps", [((2, 6, 5, 64), 32, 1e-5), ((3, 7, 48), 8, 1e-6),
                                                ((1, 4, 4, 32), 32, 1e-6)])
def test_group_norm_matches_torch(shape, groups, eps):
  """layers.GroupNorm (positions-first sums) against torch.nn.GroupNorm, incl. an offset mean."""
  rs = np.random.RandomState(len(shape))
  x = (rs.randn(*shape) * 3 + 2).astype(np.float32)
  scale, bias = rs.randn(2, shape[-1]).astype(np.float32)
  module = layers.GroupNorm(eps, groups)
  params = {"norm": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  assert jax.tree.structure(module.init(jax.random.PRNGKey(0), x)["params"]) == jax.tree.structure(
      params)
  got = module.apply({"params": params}, x)
  ref = torch.nn.GroupNorm(groups, shape[-1], eps=eps)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(scale))
    ref.bias.copy_(torch.from_numpy(bias))
    want = ref(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(want, 1, -1), atol=2e-5, rtol=1e-5)
  # A compute dtype changes only the output's type; statistics stay float32.
  half = layers.GroupNorm(eps, groups, dtype=jnp.bfloat16).apply({"params": params}, x)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(got), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_phased_upsample_conv_matches_torch(size):
  """upsample_conv3x3 (four 2x2 phase convs) == torch interpolate(nearest, x2) + conv2d(pad 1),
  in value and in gradient with respect to the input and the kernel."""
  rs = np.random.RandomState(size)
  x = rs.randn(2, size, size + 1, 6).astype(np.float32)
  kernel = rs.randn(3, 3, 6, 5).astype(np.float32)
  cot = rs.randn(2, 2 * size, 2 * size + 2, 5).astype(np.float32)  # a random output cotangent
  loss = lambda x, k: jnp.sum(kernels.upsample_conv3x3(x, k) * cot)
  got = kernels.upsample_conv3x3(x, kernel)
  gx, gk = jax.grad(loss, argnums=(0, 1))(x, kernel)
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  tk = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous().requires_grad_()
  up = torch.nn.functional.interpolate(tx, scale_factor=2.0, mode="nearest")
  want = torch.nn.functional.conv2d(up, tk, padding=1)
  (want * torch.from_numpy(cot).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_allclose(np.asarray(got), want.detach().permute(0, 2, 3, 1).numpy(),
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), tx.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gk), tk.grad.permute(2, 3, 1, 0).numpy(), atol=1e-4,
                             rtol=1e-5)


def test_upsample_block_uses_the_phased_conv_above_the_threshold(monkeypatch):
  """layers.Upsample takes the phased path (on CPU) only from CPU_PHASED_UPSAMPLE_MIN input positions on,
  and both paths give the same output."""
  rs = np.random.RandomState(0)
  x = rs.randn(1, 4, 4, 8).astype(np.float32)
  block = layers.Upsample(8)
  params = block.init(jax.random.PRNGKey(0), x)
  calls = []
  phased_fn = upsample.upsample_conv3x3
  monkeypatch.setattr(upsample, "upsample_conv3x3", lambda *a: calls.append(1) or phased_fn(*a))
  monkeypatch.setattr(upsample, "CPU_PHASED_UPSAMPLE_MIN", 17)  # 4 x 4 = 16 positions: plain
  plain = block.apply(params, x)
  assert not calls
  monkeypatch.setattr(upsample, "CPU_PHASED_UPSAMPLE_MIN", 16)
  phased = block.apply(params, x)
  assert calls
  assert plain.shape == phased.shape == (1, 8, 8, 8)
  np.testing.assert_allclose(np.asarray(phased), np.asarray(plain), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, eps", [((2, 5, 48), 1e-5), ((3, 7), 1e-12)])
def test_layer_norm_matches_torch_with_gradients(shape, eps):
  """layers.LayerNorm (its own VJP) against torch's layer_norm: value and the gradients with
  respect to the input, the scale and the bias, under a random cotangent and an offset mean."""
  rs = np.random.RandomState(len(shape))
  x = (rs.randn(*shape) * 3 + 2).astype(np.float32)
  scale, bias = (1 + rs.randn(2, shape[-1])).astype(np.float32)
  cot = rs.randn(*shape).astype(np.float32)
  module = layers.LayerNorm(eps)
  params = {"norm": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
  flax_template = {"norm": jax.eval_shape(nn.LayerNorm(eps).init, jax.random.PRNGKey(0), x)[
      "params"]}
  assert jax.tree.map(lambda a: a.shape, template) == jax.tree.map(lambda a: a.shape,
                                                                   flax_template)
  loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) * cot)
  got = module.apply({"params": params}, x)
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  tx, ts, tb = (torch.from_numpy(a).requires_grad_() for a in (x, scale, bias))
  want = torch.nn.functional.layer_norm(tx, (shape[-1],), ts, tb, eps)
  (want * torch.from_numpy(cot)).sum().backward()
  np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_x), tx.grad.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(g_params["norm"]["scale"]), ts.grad.numpy(), atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(g_params["norm"]["bias"]), tb.grad.numpy(), atol=1e-4,
                             rtol=1e-4)


def test_lean_vjps_keep_less_memory_than_plain_autodiff(monkeypatch):
  """The gradient of a SpatialTransformer keeps less XLA temp memory with `kernels.geglu` and
  `kernels.layer_norm` than with JAX's derivative of the same expressions, and geglu loses its
  saving when its recomputation is not tied to the cotangent (XLA:CPU then merges it with the
  forward pass's)."""
  # 8x8 tokens: the feed-forward and LayerNorm arrays, not the attention weights, set the peak.
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 64).astype(np.float32))
  ctx = jnp.asarray(np.random.RandomState(1).randn(2, 8, 32).astype(np.float32))
  module = attention.SpatialTransformer(4, 16)
  params = module.init(jax.random.PRNGKey(0), x, ctx)["params"]

  def temp_mib():
    loss = lambda p, x: jnp.sum(jnp.square(module.apply({"params": p}, x, ctx)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20

  lean = temp_mib()
  ff_array, ln_array = 2 * 64 * 256 * 4 / 2 ** 20, 2 * 64 * 64 * 4 / 2 ** 20  # MiB
  with monkeypatch.context() as m:
    m.setattr(kernels, "geglu", lambda value, gate: value * activations.gelu_erf(gate))
    assert temp_mib() >= lean + 0.9 * ff_array
  with monkeypatch.context() as m:
    m.setattr(vjp, "after_cotangent", lambda ct, tree: tree)
    assert temp_mib() >= lean + 0.9 * ff_array

  def plain_layer_norm(x, scale, bias, epsilon):
    mean, rstd = norm._stats(x, epsilon)  # pylint: disable=protected-access
    return (x - mean) * rstd * scale + bias
  with monkeypatch.context() as m:
    m.setattr(kernels, "layer_norm", plain_layer_norm)
    assert temp_mib() >= lean + 2 * ln_array  # three LayerNorms, each keeping arrays of x's size
