"""FID Inception-v3 against pytorch-fid 0.3.0 (random weights through the real .pth importer).

The reference network is pytorch-fid's own `InceptionV3` / `fid_inception_v3` (see fid_reference),
given a seeded random state dict instead of the download. That state dict goes through
`torch.save` and our safe .pth reader, converter and .npz cache, so the test covers the file path
a user takes with `pt_inception-2015-12-05-6726825d.pth`.
"""

import jax
import numpy as np
import pytest

import fid_reference
from ldm_jax.convert import inception as convert
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.eval import inception
from ldm_jax.parallel import count_params

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-4
_APPLY = jax.jit(inception.FIDInceptionV3().apply)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(torch state dict, .pth path, .npz path written by the CLI)."""
  fid_reference.pytorch_fid_inception()  # skips when the reference is not installed
  sd = fid_reference.random_state_dict(seed=0)
  root = tmp_path_factory.mktemp("fid_inception")
  pth, npz = str(root / "pt_inception_random.pth"), str(root / "fid_inception.npz")
  torch.save(sd, pth)
  assert convert.main(["--pth", pth, "--out", npz]) == 0
  return sd, pth, npz


@pytest.mark.parametrize("hw", [(64, 96), (400, 333), (299, 299), (300, 298)])
def test_resize_matches_torch_bilinear(hw):
  x = np.random.default_rng(sum(hw)).random((2, *hw, 3), dtype=np.float32)  # [B, H, W, 3]
  got = np.asarray(jax.jit(inception.resize_bilinear)(x))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  want = F.interpolate(xt, size=(299, 299), mode="bilinear", align_corners=False)
  want = want.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=2e-6)
  if min(hw) > 299:
    # Shrinking: torch's default does not antialias; the antialiased result is clearly different.
    smooth = F.interpolate(xt, size=(299, 299), mode="bilinear", align_corners=False,
                           antialias=True).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - smooth).max() > 1e-2


@pytest.fixture(scope="module")
def reference(weights):
  return fid_reference.reference_models(weights[0])


@pytest.mark.parametrize("shape", [(2, 64, 80, 3), (1, 299, 299, 3)], ids=["resized", "299"])
def test_pytorch_fid_parity(weights, reference, shape):
  images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  params = convert.load_inception_params(weights[2])
  want = fid_reference.reference_outputs(reference, images)
  got = _APPLY({"params": params}, inception.preprocess(images))
  for name in ("pool", "logits", "logits_unbiased"):
    assert got[name].shape == want[name].shape and got[name].dtype == np.float32
    assert np.std(want[name]) > 0.1, f"{name}: degenerate reference activations"
    err = np.abs(np.asarray(got[name], np.float64) - want[name]).max()
    assert err <= TOL, f"{name} of {images.shape}: max error {err:.3g}"


def test_converted_npz_equals_direct_pth_import(weights):
  sd, pth, npz = weights
  from_pth = convert.load_inception_params(pth)  # .pth through the safe reader, no torch
  from_npz = convert.load_inception_params(npz)
  flat_pth, flat_npz = convert.flatten(from_pth), convert.flatten(from_npz)
  assert flat_pth.keys() == flat_npz.keys()
  for k in flat_pth:
    np.testing.assert_array_equal(flat_pth[k], flat_npz[k])
  # Spot-check the renames and layouts against the torch tensors.
  conv = sd["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # [O, I, 1, 7]
  np.testing.assert_array_equal(from_npz["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                conv.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(from_npz["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                sd["Mixed_7c.branch_pool.bn.running_var"].numpy())
  np.testing.assert_array_equal(from_npz["fc"]["kernel"], sd["fc.weight"].numpy().T)
  n_torch = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
  assert count_params(from_npz) == n_torch == 23_885_392


def test_bad_weights_are_reported(weights, tmp_path):
  sd, _, npz = weights
  sd = {k: v.numpy() for k, v in sd.items()}
  broken = dict(sd)
  del broken["Mixed_5b.branch1x1.bn.running_mean"]
  broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  broken["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  with pytest.raises(WeightLoadError) as info:
    convert.inception_from_torch(broken)
  msg = str(info.value)
  for text in ("missing keys (1)", "Mixed_5b.branch1x1.bn.running_mean", "unexpected keys (1)",
               "AuxLogits.fc.weight", "shape mismatches (1)", "Mixed_7c.branch_pool.conv.weight"):
    assert text in msg
  # A torchvision ImageNet Inception (1000 classes) is the classic wrong file.
  imagenet = dict(sd, **{"fc.weight": sd["fc.weight"][:1000], "fc.bias": sd["fc.bias"][:1000]})
  with pytest.raises(WeightLoadError, match="fc.weight"):
    convert.inception_from_torch(imagenet)

  with pytest.raises(FileNotFoundError, match="python -m ldm_jax.convert.inception"):
    convert.load_inception_params(str(tmp_path / "missing.npz"))
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(WeightLoadError, match="garbage.pth"):
    convert.load_inception_params(str(garbage))
  truncated = tmp_path / "partial.npz"
  with np.load(npz) as data:
    np.savez(truncated, **{k: data[k] for k in data.files if not k.startswith("Mixed_7c/")})
  with pytest.raises(WeightLoadError, match="Mixed_7c/branch1x1/conv/kernel"):
    convert.load_inception_params(str(truncated))
  assert convert.main(["--pth", str(garbage), "--out", str(tmp_path / "x.npz")]) == 2
  assert convert.main(["--pth", str(garbage), "--out", str(tmp_path / "x.bin")]) == 2
  assert not (tmp_path / "x.npz").exists()


def test_input_shape_is_checked():
  params = inception.inception_template()
  with pytest.raises(ValueError, match=r"expected \[B, H, W, 3\]"):
    jax.eval_shape(inception.FIDInceptionV3().apply, {"params": params},
                   jax.ShapeDtypeStruct((2, 3, 64, 64), np.float32))  # NCHW by mistake
