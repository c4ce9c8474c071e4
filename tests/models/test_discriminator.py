"""NLayerDiscriminator against taming-transformers' own torch module (PyPI taming-transformers,
installed with --no-deps; its discriminator imports only torch), with every weight randomised."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.discriminator import NLayerDiscriminator

torch = pytest.importorskip("torch")
taming_disc = pytest.importorskip("taming.modules.discriminator.model",
                                  reason="pip install --no-deps taming-transformers")

NDF, LAYERS = 8, 3


def _key(seed):
  # The 'rbg' generator compiles in a fraction of threefry's time on a busy CPU; the
  # initialisers under test do not depend on the generator.
  return jax.random.key(seed, impl="rbg")


def _to_flax(torch_model, use_actnorm):
  """taming `main.{i}.*` state dict -> (params, batch_stats) named `main_{i}`."""
  params, stats = {}, {}
  for key, value in torch_model.state_dict().items():
    _, index, field = key.split(".")
    v = value.detach().numpy().copy()  # torch updates buffers in place on the next forward
    mod = torch_model.main[int(index)]
    name = f"main_{index}"
    if isinstance(mod, torch.nn.Conv2d):
      params.setdefault(name, {})["kernel" if field == "weight" else "bias"] = (
          v.transpose(2, 3, 1, 0) if field == "weight" else v)
    elif use_actnorm:
      if field in ("loc", "scale"):
        params.setdefault(name, {})[field] = v.reshape(-1)
    elif field in ("weight", "bias"):
      params.setdefault(name, {})["scale" if field == "weight" else "bias"] = v
    elif field in ("running_mean", "running_var"):
      stats.setdefault(name, {})["mean" if field == "running_mean" else "var"] = v
  return params, stats


def _randomise(torch_model):
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if p.ndim == 4:
        p.normal_(0.0, (1.0 / (p.shape[1] * 16)) ** 0.5)
      elif name.endswith("weight") or name.endswith("scale"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.3)
    for name, b in torch_model.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0.0, 0.3)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 2.0)


def _nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def test_batchnorm_train_and_eval_match_taming():
  torch.manual_seed(0)
  ref = taming_disc.NLayerDiscriminator(input_nc=3, ndf=NDF, n_layers=LAYERS, use_actnorm=False)
  _randomise(ref)
  params, stats = _to_flax(ref, False)
  model = NLayerDiscriminator(ndf=NDF, n_layers=LAYERS)
  x = torch.rand(2, 3, 32, 32) * 2 - 1
  # Train mode: batch statistics for the output, running averages updated as torch does.
  ref.train()
  with torch.no_grad():
    want = ref(x).numpy()
  got, new_vars = model.apply({"params": params, "batch_stats": stats}, _nhwc(x), train=True,
                              mutable=["batch_stats"])
  assert want.shape == (2, 1, 2, 2)
  np.testing.assert_allclose(_nchw(got), want, rtol=1e-4, atol=1e-5)
  _, new_stats = _to_flax(ref, False)
  for name, s in new_stats.items():
    for field in ("mean", "var"):
      np.testing.assert_allclose(np.asarray(new_vars["batch_stats"][name][field]), s[field],
                                 rtol=1e-5, atol=1e-6, err_msg=f"{name}/{field}")
  # Eval mode: the running averages normalise.
  ref.eval()
  with torch.no_grad():
    want_eval = ref(x).numpy()
  got_eval = model.apply({"params": params, "batch_stats": new_stats}, _nhwc(x), train=False)
  np.testing.assert_allclose(_nchw(got_eval), want_eval, rtol=1e-4, atol=1e-5)
  assert np.abs(want_eval - want).max() > 1e-3  # the two modes really differ


def test_actnorm_data_dependent_init_matches_taming():
  model = NLayerDiscriminator(ndf=NDF, n_layers=LAYERS, use_actnorm=True)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 24, 24, 3)), jnp.float32)
  variables = jax.jit(model.init)(_key(1), x0)
  assert "batch_stats" not in variables
  params = variables["params"]
  # Copy our conv weights into taming's module; its first train-mode forward runs its own
  # ActNorm initialisation, which must land on our loc / scale.
  ref = taming_disc.NLayerDiscriminator(input_nc=3, ndf=NDF, n_layers=LAYERS, use_actnorm=True)
  with torch.no_grad():
    for i, mod in enumerate(ref.main):
      if isinstance(mod, torch.nn.Conv2d):
        p = params[f"main_{i}"]
        mod.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
        mod.bias.copy_(torch.from_numpy(np.array(p["bias"])))
  ref.train()
  with torch.no_grad():
    want = ref(torch.from_numpy(_nchw(x0).copy())).numpy()
  torch_params, _ = _to_flax(ref, True)
  for i in (3, 6, 9):
    for field in ("loc", "scale"):
      np.testing.assert_allclose(np.asarray(params[f"main_{i}"][field]),
                                 torch_params[f"main_{i}"][field], rtol=1e-4, atol=1e-5)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(_nchw(apply({"params": params}, x0)), want, rtol=1e-4, atol=1e-5)
  # After init both are fixed affine maps: a second batch matches too.
  x1 = jnp.asarray(rng.normal(size=(1, 24, 24, 3)), jnp.float32)
  with torch.no_grad():
    want1 = ref(torch.from_numpy(_nchw(x1).copy())).numpy()
  np.testing.assert_allclose(_nchw(apply({"params": params}, x1)), want1, rtol=1e-4, atol=1e-5)


def test_default_size_shapes_and_weights_init():
  model = NLayerDiscriminator()  # input_nc 3, ndf 64, n_layers 3, BatchNorm
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(model.init, _key(0), x)
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
  ref = taming_disc.NLayerDiscriminator()
  assert count == sum(p.numel() for p in ref.parameters())
  apply_eval = functools.partial(model.apply, train=False)
  assert jax.eval_shape(apply_eval, variables, x).shape == (1, 30, 30, 1)
  assert "bias" not in variables["params"]["main_2"]  # conv before BatchNorm has no bias
  # weights_init: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02), bias 0.
  params = jax.jit(model.init)(_key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  kernel = np.asarray(params["main_8"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
  scale = np.asarray(params["main_9"]["scale"])
  assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
  np.testing.assert_array_equal(np.asarray(params["main_9"]["bias"]), 0.0)
  with pytest.raises(ValueError, match="input_nc=3"):
    model.init(_key(0), jnp.zeros((1, 32, 32, 4)))
