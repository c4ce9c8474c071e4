"""UNet blocks against the original CompVis modules, with inputs small enough to pin the epsilons.

Whole-UNet parity (test_unet_compvis.py) runs at activation scales where GroupNorm / LayerNorm
epsilons barely matter; here the block inputs have a variance near 1e-6, so a 1e-5 vs 1e-6 mix-up
(SpatialTransformer GroupNorm 1e-6, LayerNorm 1e-5, AttentionBlock / ResBlock GroupNorm 1e-5)
changes the output far beyond the tolerance. Weights go through the same key mapping as
`unet_from_compvis`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert import common
from ldm_jax.convert import unet as convert_unet
from ldm_jax.models import attention
from ldm_jax.models.unet import Layer, ResBlock

openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
ldm_attention = pytest.importorskip("ldm.modules.attention")


def _load(module, torch_module, kind, heads, inputs, linear_proj=False):
  """Our block's params from the torch block's state dict via the UNet importer's key mapping."""
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
  layer = Layer(kind, "input", 1, 1, 0, 0, 32, heads)
  sd = {k: v.numpy() for k, v in torch_module.state_dict().items()}
  key_fn = lambda path: convert_unet._local(layer, path, False, linear_proj)
  return common.strict_load(template, sd, key_fn, what=kind)


def _randomise(torch_module, **scales):
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in torch_module.named_parameters():
      p.normal_(0, 0.2)
      for prefix, scale in scales.items():
        if name.startswith(prefix):
          p.mul_(scale)
  return torch_module.eval()


@pytest.mark.parametrize("use_linear, disable_self_attn", [(False, False), (True, True)])
def test_spatial_transformer_matches_compvis(use_linear, disable_self_attn):
  # proj_in scaled down so the tokens reaching norm1 are tiny too (LayerNorm eps 1e-5 matters).
  ref_block = _randomise(ldm_attention.SpatialTransformer(
      32, 2, 16, depth=2, context_dim=[24, 24], disable_self_attn=disable_self_attn,
      use_linear=use_linear, use_checkpoint=False), proj_in=1e-2)
  rs = np.random.RandomState(0)
  x = (rs.randn(2, 32, 4, 4) * 1e-3).astype(np.float32)  # variance 1e-6 ~ the GroupNorm eps
  ctx = rs.randn(2, 5, 24).astype(np.float32)
  block = attention.SpatialTransformer(2, 16, depth=2, disable_self_attn=disable_self_attn)
  inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx))
  params = _load(block, ref_block, "transformer", 2, inputs, linear_proj=use_linear)
  with torch.no_grad():
    # The reference takes one context per transformer block when depth > 1.
    context = [torch.from_numpy(ctx)] * 2
    ref = ref_block(torch.from_numpy(x), context).numpy() - x  # the residual branch
  out = np.asarray(block.apply({"params": params}, *inputs)).transpose(0, 3, 1, 2) - x
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4 * scale)


@pytest.mark.parametrize("heads", [1, 4])
def test_legacy_attention_block_matches_compvis(heads):
  ref_block = _randomise(openaimodel.AttentionBlock(32, num_heads=heads))
  x = (np.random.RandomState(1).randn(2, 32, 4, 4) * 1e-3).astype(np.float32)
  block = attention.AttentionBlock(heads)
  inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)),)
  params = _load(block, ref_block, "attention", heads, inputs)
  with torch.no_grad():
    ref = ref_block(torch.from_numpy(x)).numpy() - x
  out = np.asarray(block.apply({"params": params}, *inputs)).transpose(0, 3, 1, 2) - x
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4 * scale)


@pytest.mark.parametrize("scale_shift, resample", [(False, None), (True, "down"), (True, "up")])
def test_resblock_matches_compvis(scale_shift, resample):
  """The UNet's ResBlock (GroupNorm eps 1e-5) on a tiny-variance input, with a 1x1 skip conv."""
  ref_block = _randomise(openaimodel.ResBlock(
      32, 16, 0.0, out_channels=64, use_scale_shift_norm=scale_shift,
      up=resample == "up", down=resample == "down"))
  rs = np.random.RandomState(2)
  x = (rs.randn(2, 32, 4, 4) * 1e-3).astype(np.float32)
  emb = rs.randn(2, 16).astype(np.float32)
  block = ResBlock(64, use_scale_shift_norm=scale_shift, resample=resample)
  inputs = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(emb))
  params = _load(block, ref_block, "res", 0, inputs)
  with torch.no_grad():
    ref = ref_block(torch.from_numpy(x), torch.from_numpy(emb)).numpy()
  out = np.asarray(block.apply({"params": params}, *inputs)).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4 * scale)


def test_feed_forward_matches_compvis_with_gradients():
  # GEGLU: our "proj" Dense is applied as two matmuls over the kernel's halves and the GELU is
  # written with erf; both must still be CompVis's FeedForward(glu=True), values and gradients.
  dim, mult = 16, 4
  ref = _randomise(ldm_attention.FeedForward(dim, mult=mult, glu=True))
  x = np.random.RandomState(5).randn(2, 6, dim).astype(np.float32) * 2  # GELU's curved region
  ours = attention.FeedForward(mult)
  params = {"proj": {"kernel": ref.net[0].proj.weight.detach().numpy().T,
                     "bias": ref.net[0].proj.bias.detach().numpy()},
            "out": {"kernel": ref.net[2].weight.detach().numpy().T,
                    "bias": ref.net[2].bias.detach().numpy()}}
  template = jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  assert jax.tree_util.tree_map(lambda a: a.shape, template) == jax.tree_util.tree_map(
      lambda a: a.shape, params)
  tx = torch.from_numpy(x).requires_grad_()
  out_t = ref(tx)
  out_t.pow(3).sum().backward()  # a non-linear loss: the cotangent differs per element

  def loss(p, x):
    out = ours.apply({"params": p}, x)
    return jnp.sum(out ** 3), out
  (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, jnp.asarray(x))
  np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, tx.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_params["proj"]["kernel"], ref.net[0].proj.weight.grad.numpy().T,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_params["proj"]["bias"], ref.net[0].proj.bias.grad.numpy(),
                             rtol=1e-4, atol=1e-4)
