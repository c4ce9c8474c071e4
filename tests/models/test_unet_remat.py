"""UNetModel options that must not change the maths: remat, and bf16 compute over fp32 params.

The model is a one-level UNet (no resampling, no input res blocks) so that compiling its gradient
stays short on CPU; it still has ResBlocks with dropout and a SpatialTransformer, which is what
`remat` wraps. How much memory remat saves is tested in test_remat.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.unet import UNetModel

_ONE_LEVEL = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=0,
                  attention_resolutions=(1,), channel_mult=(1,), num_heads=2,
                  use_spatial_transformer=True, context_dim=8)


def _tiny_inputs(batch=2, size=8):
  rs = np.random.RandomState(1)
  return (jnp.asarray(rs.randn(batch, size, size, 4), jnp.float32),
          jnp.asarray([5.0, 900.0][:batch]), jnp.asarray(rs.randn(batch, 3, 8), jnp.float32))


def _random_params(model, x, t, ctx, std):
  """Initialised, then every leaf redrawn non-zero (out_conv / proj_out start at zero otherwise)."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, ctx)["params"]
  rs = np.random.RandomState(3)  # numpy: eager jax.random would compile once per leaf shape
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rs.randn(*p.shape) * std, jnp.float32), params)


def test_remat_matches_plain_forward_dropout_and_gradients():
  x, t, ctx = _tiny_inputs(batch=1, size=4)
  plain = UNetModel(dropout=0.3, **_ONE_LEVEL)
  remat = UNetModel(dropout=0.3, remat=True, **_ONE_LEVEL)
  params = _random_params(plain, x, t, ctx, 0.2)
  remat_shapes = jax.eval_shape(remat.init, jax.random.PRNGKey(0), x, t, ctx)["params"]
  assert (jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params))
  # remat really inserts rematerialisation points: with dropout on, jax.checkpoint (remat2 /
  # checkpoint); deterministic on CPU, remat.recompute's custom VJP.
  def n_prims(m, pattern, **kw):
    jaxpr = jax.make_jaxpr(lambda p: m.apply({"params": p}, x, t, ctx, rngs={
        "dropout": jax.random.PRNGKey(7)}, **kw))(params)
    return len(re.findall(pattern, str(jaxpr)))
  stochastic, deterministic = dict(deterministic=False), dict(deterministic=True)
  checkpoint, custom_vjp = r"\b(?:remat\d*|checkpoint)\[", r"\bcustom_vjp_call\["
  # Without remat the only custom VJPs are each SpatialTransformer's 3 LayerNorms, 1 GEGLU and
  # 2 attentions.
  assert n_prims(plain, checkpoint, **stochastic) == 0 and n_prims(plain, custom_vjp) == 2 * 6
  # 3 ResBlocks (with dropout) + 2 SpatialTransformers (without).
  assert n_prims(remat, checkpoint, **stochastic) == 3
  assert n_prims(remat, custom_vjp, **stochastic) == 2 * 6 + 2
  assert n_prims(remat, custom_vjp, **deterministic) == 2 * 6 + 5

  def loss(model, p):
    out = model.apply({"params": p}, x, t, ctx, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(7)})
    return jnp.mean(out ** 2), out

  (l0, o0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(params)
  (l1, o1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p), has_aux=True))(params)
  np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-5)
  g0, g1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
  scale = max(float(jnp.abs(g).max()) for g in g0)  # some grads are analytically ~0 (pre-GN biases)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  # Deterministic (remat.recompute's custom VJP on CPU): same outputs and gradients.
  det_grad = lambda m: jax.jit(jax.grad(lambda p: jnp.mean(
      m.apply({"params": p}, x, t, ctx) ** 2)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(det_grad(remat)),
                  jax.tree_util.tree_leaves(det_grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  # Dropout is really on: a deterministic pass differs.
  det = jax.jit(plain.apply)({"params": params}, x, t, ctx)
  assert float(jnp.abs(det - o0).max()) > 1e-3


def test_bf16_compute_with_fp32_params_is_close():
  x, t, ctx = _tiny_inputs(size=4)
  f32 = UNetModel(**_ONE_LEVEL)
  bf16 = UNetModel(dtype=jnp.bfloat16, **_ONE_LEVEL)
  params = _random_params(f32, x, t, ctx, 0.1)
  ref = jax.jit(f32.apply)({"params": params}, x, t, ctx)
  out = jax.jit(bf16.apply)({"params": params}, x, t, ctx)
  assert out.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert err < 5e-2 * float(jnp.abs(ref).max())


