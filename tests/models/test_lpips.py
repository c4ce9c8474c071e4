"""LPIPS(vgg) against the PyPI `lpips` package (0.1.4), and the weight importer / .npz round trip.

`lpips` imports torchvision, whose PyPI wheels do not load beside this torch build, so it is
installed with `pip install --no-deps lpips` and a minimal `torchvision.models` stub is placed in
sys.modules while it is imported and built. The stub only supplies `vgg16().features`: the
standard VGG16 conv stack built from plain torch.nn. Scaling layer, slicing, normalisation, heads
and averaging are the lpips package's own code.
"""

import copy
import importlib.machinery
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert import lpips as convert_lpips
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.models.lpips import LPIPS, lpips_fn

torch = pytest.importorskip("torch")
nn = torch.nn

# One compiled LPIPS shared by the tests, so equal shapes compile once.
_APPLY = jax.jit(LPIPS().apply, static_argnames="keepdims")
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_features():
  """torchvision's vgg16().features, rebuilt from its published configuration "D"."""
  layers, cin = [], 3
  for v in VGG16_CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      cin = v
  return nn.Sequential(*layers)


def _stub_torchvision():
  tv = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")
  for m in (tv, models):
    m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)

  def vgg16(pretrained=False, weights=None, **unused):
    assert not pretrained and weights is None, "the stub has no pretrained weights"
    return types.SimpleNamespace(features=_vgg16_features())

  models.vgg16 = vgg16
  tv.models = models
  return {"torchvision": tv, "torchvision.models": models}


@pytest.fixture(scope="module")
def torch_lpips():
  """An lpips.LPIPS(net='vgg') with every weight random and non-zero, in eval mode."""
  saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
  sys.modules.update(_stub_torchvision())
  try:
    lpips = pytest.importorskip("lpips", reason="pip install --no-deps lpips==0.1.4")
    torch.manual_seed(0)
    model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
  finally:
    # Leave no fake torchvision behind for other tests (transformers probes for it).
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("lin"):
        p.copy_(torch.rand_like(p) * 0.9 + 0.1)  # positive heads, like the trained ones
      elif p.ndim == 4:
        p.normal_(0.0, (2.0 / (p.shape[1] * 9)) ** 0.5)  # He scale keeps 13 ReLU layers alive
      else:
        p.normal_(0.05, 0.05)
  return model.eval()


def _split_state_dicts(model):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  # lpips keeps torchvision's indices inside its slices: net.slice1.0.weight == features.0.weight.
  vgg = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("net.slice")}
  lin = {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins.")}
  return vgg, lin


def _images(seed, shape=(2, 3, 32, 32)):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(shape, generator=g) * 2 - 1  # [B, C, H, W] in [-1, 1]


def _nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def test_matches_lpips_package(torch_lpips):
  vgg, lin = _split_state_dicts(torch_lpips)
  assert len(vgg) == 26 and len(lin) == 5  # 13 convs (weight, bias), 5 heads
  params = convert_lpips.lpips_from_torch(vgg, lin, LPIPS())
  x0, x1 = _images(1), _images(2)
  # A batch of 2 plus an odd size (36 -> 18 -> 9 -> 4 -> 2) to exercise flooring max-pools.
  y0, y1 = _images(3, (1, 3, 36, 44)), _images(4, (1, 3, 36, 44))
  for a, b in ((x0, x1), (y0, y1)):
    with torch.no_grad():
      want = torch_lpips(a, b).numpy()  # [B, 1, 1, 1]
    got = _APPLY({"params": params}, _nhwc(a), _nhwc(b), keepdims=True)
    assert got.shape == want.shape
    assert float(np.min(want)) > 1e-3, "degenerate reference: distances near zero"
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=0)


def test_identical_images_give_zero_and_grads_reach_only_images(torch_lpips):
  vgg, lin = _split_state_dicts(torch_lpips)
  params = convert_lpips.lpips_from_torch(vgg, lin)
  dist = lpips_fn(params)
  x = _nhwc(_images(5, (2, 3, 16, 16)))
  y = _nhwc(_images(6, (2, 3, 16, 16)))

  @jax.jit
  def run(params, x, y):
    gp, gx = jax.grad(lambda p, a: lpips_fn(p)(a, y).sum(), argnums=(0, 1))(params, x)
    return dist(x, x), dist(x, y), gp, gx

  same, different, gp, gx = run(params, x, y)
  # Compiled convs may round a batch row differently by its position (~1e-15 here), so "zero"
  # is judged against the distance of different images.
  assert float(jnp.max(same)) < 1e-9 and float(jnp.min(different)) > 1e-2
  # The trunk and heads are frozen; the images are not.
  assert float(jnp.abs(gx).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(gp))


def test_real_heads_file_and_npz_round_trip(tmp_path, torch_lpips):
  lpips = sys.modules["lpips"]
  heads_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
  heads = {k: v.numpy() for k, v in torch.load(heads_path, map_location="cpu").items()}
  vgg, _ = _split_state_dicts(torch_lpips)
  # The importer also takes a whole torchvision VGG16 state dict (classifier ignored).
  whole = {f"features.{k}": v for k, v in vgg.items()}
  whole["classifier.0.weight"] = np.zeros((4, 4), np.float32)
  torch.save({k: torch.from_numpy(v) for k, v in whole.items()}, tmp_path / "vgg16.pth")
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "heads.pth")
  out = str(tmp_path / "lpips_vgg.npz")
  assert convert_lpips.main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin",
                             str(tmp_path / "heads.pth"), "--out", out]) == 0
  loaded = convert_lpips.load_lpips_params(out)
  np.testing.assert_array_equal(loaded["lin3"]["kernel"][:, 0],
                                heads["lin3.model.1.weight"][0, :, 0, 0])
  np.testing.assert_array_equal(loaded["net"]["features_28"]["kernel"],
                                vgg["28.weight"].transpose(2, 3, 1, 0))
  # With the real heads, the Flax metric still matches the package.
  reference = copy.deepcopy(torch_lpips)
  with torch.no_grad():
    for k, v in heads.items():
      reference.state_dict()[k].copy_(torch.from_numpy(v))
    x0, x1 = _images(7), _images(8)
    want = reference(x0, x1).numpy()
  got = _APPLY({"params": loaded}, _nhwc(x0), _nhwc(x1), keepdims=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=0)


def test_errors_name_the_problem(tmp_path, torch_lpips):
  vgg, lin = _split_state_dicts(torch_lpips)
  del vgg["14.weight"]
  lin["lin2.model.1.weight"] = lin["lin2.model.1.weight"][:, :8]
  with pytest.raises(WeightLoadError) as e:
    convert_lpips.lpips_from_torch(vgg, lin)
  assert "vgg.14.weight" in str(e.value) and "lin2.model.1.weight" in str(e.value)
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="python -m ldm_jax.convert.lpips"):
    convert_lpips.load_lpips_params(missing)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    LPIPS().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 8, 8, 4)))


def test_training_dropout_is_unbiased(torch_lpips):
  """deterministic=False: the heads' Dropout(0.5), as CompVis training runs it; its mean over
  masks is the metric."""
  vgg, lin = _split_state_dicts(torch_lpips)
  params = convert_lpips.lpips_from_torch(vgg, lin)
  x, y = _nhwc(_images(9, (1, 3, 16, 16))), _nhwc(_images(10, (1, 3, 16, 16)))
  model = LPIPS()

  @jax.jit
  def both(keys):
    exact = model.apply({"params": params}, x, y)
    noisy = jax.vmap(lambda k: model.apply({"params": params}, x, y, deterministic=False,
                                           rngs={"dropout": k}))(keys)
    return exact, noisy[:, 0]

  exact, noisy = both(jax.random.split(jax.random.key(0, impl="rbg"), 64))
  assert float(jnp.std(noisy)) > 1e-3 * float(exact[0])
  np.testing.assert_allclose(float(jnp.mean(noisy)), float(exact[0]), rtol=0.1)
