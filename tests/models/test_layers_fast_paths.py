"""The CPU fast paths of `layers` against torch: blocked attention, im2col convs, GroupNorm.

Blocking only reorders the attention loop (each query row still takes its softmax over every key),
so outputs and gradients must equal torch's scaled_dot_product_attention at fp32 round-off, for
one block, blocks of whole (batch, head) pairs, query chunks of one pair and a query length with no
divisor that fits the budget. `layers.conv` on maps smaller than its kernel (computed as im2col +
matmul) must equal torch's conv2d, and `layers.GroupNorm` torch's GroupNorm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models import layers


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
  assert layers.attention_blocks(2 * 3, lq, lk, budget) == blocks
  rs = np.random.RandomState(lq)
  q = rs.randn(2, lq, 3, 8).astype(np.float32)
  k, v = (rs.randn(2, lk, 3, 8).astype(np.float32) for _ in range(2))
  got = jax.jit(lambda q, k, v: layers.attention(q, k, v, scale=0.3, block_budget=budget))(
      q, k, v)
  want = _torch_attention(q, k, v, 0.3)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_blocked_attention_gradients_match_torch():
  rs = np.random.RandomState(0)
  q = rs.randn(2, 32, 2, 8).astype(np.float32)
  k, v = (rs.randn(2, 24, 2, 8).astype(np.float32) for _ in range(2))
  w = rs.randn(2, 32, 2, 8).astype(np.float32)  # a random cotangent
  budget = 8 * 24  # 4 query chunks of each of the 4 (batch, head) pairs
  assert layers.attention_blocks(2 * 2, 32, 24, budget) == (1, 8)
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, block_budget=budget) * w)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).requires_grad_() for a in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  (out.permute(0, 2, 1, 3) * torch.from_numpy(w)).sum().backward()
  for got, ref in zip(grads, (tq, tk, tv)):
    np.testing.assert_allclose(np.asarray(got), ref.grad.permute(0, 2, 1, 3).numpy(), atol=1e-5,
                               rtol=1e-4)


def test_auto_budget_blocks_on_cpu_only_when_large():
  assert jax.default_backend() == "cpu"
  # The issue-#8 UNet's 32x32 level: 1024 tokens, 8 heads, batch 2 -> one pair per block on CPU.
  budget = layers.auto_block_budget(2 * 8 * 1024 * 1024)
  assert budget == layers.CPU_ATTENTION_BLOCK
  assert layers.attention_blocks(2 * 8, 1024, 1024, budget) == (1, 1024)
  # Its cross-attention (1024 tokens over 77) at batch 8 is computed in one piece.
  assert layers.auto_block_budget(8 * 8 * 1024 * 77) is None
  assert layers.attention_blocks(8 * 8, 1024, 77, None) == (64, 1024)
  # A masked call is never blocked, and still matches the unblocked result.
  rs = np.random.RandomState(1)
  q = rs.randn(1, 16, 1, 4).astype(np.float32)
  mask = np.tril(np.ones((16, 16), bool))
  a = layers.attention(q, q, q, mask=mask, block_budget=16)
  b = layers.attention(q, q, q, mask=mask, block_budget=None)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
  loss = lambda x, k: jnp.sum(layers.upsample_conv3x3(x, k) * cot)
  got = layers.upsample_conv3x3(x, kernel)
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
  """layers.Upsample takes the phased path only from CPU_PHASED_UPSAMPLE_MIN input positions on,
  and both paths give the same output."""
  rs = np.random.RandomState(0)
  x = rs.randn(1, 4, 4, 8).astype(np.float32)
  block = layers.Upsample(8)
  params = block.init(jax.random.PRNGKey(0), x)
  calls = []
  phased_fn = layers.upsample_conv3x3
  monkeypatch.setattr(layers, "upsample_conv3x3", lambda *a: calls.append(1) or phased_fn(*a))
  monkeypatch.setattr(layers, "CPU_PHASED_UPSAMPLE_MIN", 17)  # 4 x 4 = 16 positions: plain
  plain = block.apply(params, x)
  assert not calls
  monkeypatch.setattr(layers, "CPU_PHASED_UPSAMPLE_MIN", 16)
  phased = block.apply(params, x)
  assert calls
  assert plain.shape == phased.shape == (1, 8, 8, 8)
  np.testing.assert_allclose(np.asarray(phased), np.asarray(plain), atol=2e-5, rtol=1e-5)
