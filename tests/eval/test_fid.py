"""FID core: the Frechet distance against independent formulas, statistics, caching, extraction.

References: an eigenvalue formula for tr((S1 S2)^(1/2)) (via sqrt(S1) S2 sqrt(S1), which is
symmetric PSD and has the same eigenvalues as S1 S2), the closed form for diagonal covariances,
pytorch-fid's own `calculate_frechet_distance` and statistics files, and, for the extractor, the
same network run unsharded on one image at a time.
"""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from ldm_jax import parallel
from ldm_jax.eval import fid as fid_lib
from ldm_jax.eval.inception import inception_template

RNG = np.random.default_rng(0)


def _random_stats(rng, d, n=None, scale=1.0):
  """mu [d], a PSD sigma [d, d] of rank min(n, d)."""
  a = rng.normal(size=(d, n or 2 * d)) * scale
  return rng.normal(size=d), a @ a.T / a.shape[1]


def _eig_frechet(mu1, s1, mu2, s2):
  """Independent reference: tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # [D, D]
  lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))


# ---------------------------------------------------------------- distance and statistics --------
@pytest.mark.parametrize("method", fid_lib.FRECHET_METHODS)
@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_distance_matches_eigenvalue_formula(d, method):
  mu1, s1 = _random_stats(RNG, d)
  mu2, s2 = _random_stats(RNG, d, scale=1.7)
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2, method=method)
  want = _eig_frechet(mu1, s1, mu2, s2)
  assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
  assert got == pytest.approx(fid_lib.frechet_distance(mu2, s2, mu1, s1, method=method),
                              rel=1e-9)  # symmetric
  assert abs(fid_lib.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-8 * np.trace(s1)


def test_low_rank_trace_from_features_equals_full():
  """N < D samples: the N x N eigenproblem gives the full formula's distance."""
  feats = RNG.normal(size=(9, 40)) * 2 + 0.3  # [N, D]
  mu1, s1 = fid_lib.feature_statistics(feats)
  mu2, s2 = _random_stats(RNG, 40, scale=1.3)
  want = _eig_frechet(mu1, s1, mu2, s2)
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2, features1=feats)
  # The full formula takes square roots of S1's ~0 eigenvalues (rank 8 of 40): ~1e-8 relative noise.
  assert got == pytest.approx(want, rel=1e-7)
  with pytest.raises(ValueError, match=r"features1 has shape \(9, 39\); expected \[N, 40\]"):
    fid_lib.frechet_distance(mu1, s1, mu2, s2, features1=feats[:, :39])


def test_frechet_distance_diagonal_closed_form():
  a, b = RNG.uniform(0.1, 3.0, 32), RNG.uniform(0.1, 3.0, 32)
  mu1, mu2 = RNG.normal(size=32), RNG.normal(size=32)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  for method in fid_lib.FRECHET_METHODS:
    got = fid_lib.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(want, rel=1e-12)
  # Scalars work as 1-d Gaussians: (m1 - m2)^2 + (s1 - s2)^2 for variances s^2.
  assert fid_lib.frechet_distance(0.5, 4.0, -1.0, 9.0) == pytest.approx(1.5 ** 2 + 1.0)


def test_frechet_distance_matches_pytorch_fid():
  import fid_reference  # pylint: disable=g-import-not-at-top
  fid_reference.pytorch_fid_inception()
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  mu1, s1 = _random_stats(RNG, 48)
  mu2, s2 = _random_stats(RNG, 48, n=30)  # rank deficient
  want = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  for method in fid_lib.FRECHET_METHODS:
    assert fid_lib.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(want, rel=1e-7)


def test_singular_product_falls_back_to_eps_offset(monkeypatch):
  mu1, s1 = _random_stats(RNG, 12, n=4)
  mu2, s2 = _random_stats(RNG, 12, n=5)
  sqrtm, calls = fid_lib.linalg.sqrtm, []

  def failing_once(m):  # the first product "fails", as scipy reports a singular one
    calls.append(m)
    return np.full_like(m, np.inf) if len(calls) == 1 else sqrtm(m)

  monkeypatch.setattr(fid_lib.linalg, "sqrtm", failing_once)
  eps = 1e-3
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2, eps=eps, method="sqrtm")
  assert len(calls) == 2
  offset = eps * np.eye(12)
  # The offset enters only the square root: tr(S1) + tr(S2) keep the original covariances.
  want = (_eig_frechet(mu1, s1 + offset, mu2, s2 + offset) - 2 * 12 * eps)
  assert got == pytest.approx(want, rel=1e-7)


def test_frechet_distance_rejects_bad_input():
  mu, s = _random_stats(RNG, 4)
  with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\); expected \(4, 4\)"):
    fid_lib.frechet_distance(mu, s, mu, s[:3, :3])
  with pytest.raises(ValueError, match="mu2 holds non-finite"):
    fid_lib.frechet_distance(mu, s, mu * np.nan, s)
  with pytest.raises(ValueError, match="method='svd'; expected one of"):
    fid_lib.frechet_distance(mu, s, mu, s, method="svd")


def test_feature_statistics_closed_form():
  x = RNG.normal(size=(50, 6)).astype(np.float32) * 3 + 1  # [N, D]
  mu, sigma = fid_lib.feature_statistics(x)
  xc = x.astype(np.float64) - x.astype(np.float64).sum(0) / 50
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).sum(0) / 50, rtol=1e-12)
  np.testing.assert_allclose(sigma, xc.T @ xc / 49, rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    fid_lib.feature_statistics(x[:1])


def test_stats_files_interoperate_with_pytorch_fid(tmp_path):
  import fid_reference  # pylint: disable=g-import-not-at-top
  fid_reference.pytorch_fid_inception()
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  mu, sigma = _random_stats(RNG, 5)
  ours = str(tmp_path / "ours.npz")
  fid_lib.save_stats(ours, mu, sigma)
  # pytorch-fid reads our file (`compute_statistics_of_path` on an .npz) ...
  m2, s2 = fid_score.compute_statistics_of_path(ours, model=None, batch_size=1, dims=5,
                                                device="cpu")
  np.testing.assert_array_equal(m2, mu)
  np.testing.assert_array_equal(s2, sigma)
  # ... and we read theirs (`np.savez_compressed(path, mu=..., sigma=...)` in save_fid_stats).
  theirs = str(tmp_path / "theirs.npz")
  np.savez_compressed(theirs, mu=mu.astype(np.float32), sigma=sigma)
  m3, s3 = fid_lib.load_stats(theirs)
  assert m3.dtype == np.float64
  np.testing.assert_allclose(m3, mu, rtol=1e-6)
  np.testing.assert_array_equal(s3, sigma)
  np.savez(tmp_path / "wrong.npz", mean=mu, cov=sigma)
  with pytest.raises(ValueError, match=r"holds \['cov', 'mean'\]; expected the keys 'mu'"):
    fid_lib.load_stats(str(tmp_path / "wrong.npz"))
  with pytest.raises(FileNotFoundError):
    fid_lib.load_stats(str(tmp_path / "absent.npz"))


# ---------------------------------------------------------------- feature extraction -------------
@pytest.fixture(scope="module")
def params():
  """Random weights drawn in numpy on the template (no init to compile): He-scaled kernels keep
  the 94 layers' activations O(1); BatchNorm statistics are not the identity."""
  rng = np.random.default_rng(4)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name in ("var", "scale"):
      return rng.uniform(0.7, 1.3, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # mean, bias

  return jax.tree_util.tree_map_with_path(draw, inception_template())


@pytest.fixture(scope="module")
def single(params):
  """Unsharded extractor on one device, batch 2."""
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return fid_lib.InceptionFeatureExtractor(params, batch_size=2, mesh=mesh)


def _images(n, h=40, w=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_mixed_sizes_keep_order_and_padding_is_harmless(single):
  a, b = _images(3, seed=1), _images(2, 32, 48, seed=2)
  stream = [a[0], b[0], a[1], a[2], b[1]]  # sizes interleave; the last batches are padded
  out = single(iter(stream), outputs=("pool", "logits_unbiased"))
  assert out["pool"].shape == (5, 2048) and out["logits_unbiased"].shape == (5, 1008)
  assert out["pool"].dtype == np.float32
  # Each size on its own, reversed so that other images share a batch with each one and other
  # images are padded: rows must still land back at their input positions.
  for rows, group in (([3, 2, 0], a[::-1]), ([4, 1], b[::-1])):
    alone = single(group, outputs=("pool", "logits_unbiased"))
    for name in out:
      np.testing.assert_allclose(out[name][rows], alone[name], rtol=1e-5, atol=1e-5)
  assert np.abs(out["pool"][0] - out["pool"][2]).max() > 1e-3  # distinct images differ
  np.testing.assert_array_equal(single(iter(stream), max_images=3)["pool"], out["pool"][:3])
  assert single([], outputs=("logits",))["logits"].shape == (0, 1008)


def test_sharded_equals_unsharded(params, single):
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
  sharded = fid_lib.InceptionFeatureExtractor(params, batch_size=3)  # mesh over all 8 devices
  assert sharded.mesh.size == 8 and sharded.batch_size == 8
  images = _images(5, seed=1)  # one padded batch of 8: 5 images + 3 zero images
  got = sharded(images, outputs=("pool", "logits"))
  want = single(images, outputs=("pool", "logits"))
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_bad_images_are_reported(single):
  with pytest.raises(ValueError,
                     match=r"image 1: shape \(40, 40, 3\), dtype float32; expected uint8"):
    single([_images(1)[0], _images(1)[0].astype(np.float32)])
  with pytest.raises(ValueError, match=r"image 0: shape \(40, 40\)"):
    single([_images(1)[0, :, :, 0]])
  with pytest.raises(ValueError, match=r"outputs=\('features',\)"):
    single(_images(2), outputs=("features",))
  with pytest.raises(ValueError, match="batch_size=0"):
    fid_lib.InceptionFeatureExtractor({}, batch_size=0)


# ---------------------------------------------------------------- sources and caching ------------
def test_folder_statistics_cache_and_fid(single, tmp_path, monkeypatch):
  folder, cache = tmp_path / "images", str(tmp_path / "cache")
  (folder / "sub").mkdir(parents=True)
  images = _images(3, seed=5)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / ("sub" if i == 2 else "") / f"{i}.png")
  want = fid_lib.statistics_of_images(images, single)

  mu, sigma = fid_lib.reference_statistics(str(folder), single, cache_dir=cache)
  np.testing.assert_allclose(mu, want[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sigma, want[1], rtol=1e-5, atol=1e-7)
  (cached,) = os.listdir(cache)
  with np.load(os.path.join(cache, cached)) as data:
    assert int(data["num_images"]) == 3

  calls = []
  monkeypatch.setattr(fid_lib.InceptionFeatureExtractor, "__call__",
                      lambda self, *a, **k: calls.append(1) or {"pool": np.eye(4, 2048)})
  again = fid_lib.reference_statistics(str(folder), single, cache_dir=cache)
  assert not calls  # read from the cache
  np.testing.assert_array_equal(again[0], mu)
  # Another file (or max_images, or other weights) makes another key: recomputed, not reused.
  Image.fromarray(images[0]).save(folder / "3.png")
  fid_lib.reference_statistics(str(folder), single, cache_dir=cache)
  assert calls and len(os.listdir(cache)) == 2
  monkeypatch.undo()

  # fid(): an array against a stats file and against an array. The distance itself is tested
  # above; a spy keeps scipy's sqrtm of 2048 x 2048 matrices (minutes on 2 cores) out of this test.
  stats = str(tmp_path / "ref.npz")
  fid_lib.save_stats(stats, *want)
  other = _images(3, seed=6)
  other_stats = fid_lib.statistics_of_images(other, single)
  seen = []
  monkeypatch.setattr(fid_lib, "frechet_distance", lambda *a: seen.append(a) or 1.25)
  assert fid_lib.fid(other, stats, single) == 1.25
  assert fid_lib.fid(stats, stats, single) == 1.25  # two specs: no extraction at all
  for args, expected in zip(seen, ((*other_stats, *want), (*want, *want))):
    for got, value in zip(args, expected):
      np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-9)
  monkeypatch.undo()

  with pytest.raises(ValueError, match="expected a statistics .npz file, an image folder or"):
    fid_lib.reference_statistics(str(tmp_path / "nowhere"), single)
  with pytest.raises(ValueError, match="'tfds:NAME"):
    fid_lib.reference_statistics("tfds:", single)


def test_tfds_statistics(single, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  images = _images(4, seed=7)

  class LdmJaxFidTest(tfds.core.GeneratorBasedBuilder):
    """Four random images."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(40, 40, 3))}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(images):
        yield i, {"image": Image.fromarray(image)}

  LdmJaxFidTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  got = fid_lib.reference_statistics("tfds:ldm_jax_fid_test:test", single, data_dir=str(tmp_path),
                                     cache_dir=str(tmp_path / "cache"))
  want = fid_lib.statistics_of_images(images, single)  # record order may differ: stats do not
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
  assert len(os.listdir(tmp_path / "cache")) == 1
