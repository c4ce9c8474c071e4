"""k-NN precision/recall against a brute-force scipy reference and hand-countable cases."""

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from ldm_jax.eval import precision_recall as pr


def _reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
  """Kynkaanniemi et al.'s definition in float64 with full distance matrices."""
  def radii(x):
    return np.sort(cdist(x, x), axis=1)[:, k]  # index 0 is the point itself
  r_real, r_fake = radii(real), radii(fake)
  precision = np.mean(np.any(cdist(fake, real) <= r_real[None], axis=1))
  recall = np.mean(np.any(cdist(real, fake) <= r_fake[None], axis=1))
  return {"precision": precision, "recall": recall}


@pytest.mark.parametrize("k,batch", [(3, 64), (5, 1000)])
def test_matches_brute_force(k, batch):
  rng = np.random.default_rng(k)
  # Inception-like features: non-negative, offset far from the origin, partly overlapping sets.
  real = np.abs(rng.normal(3.0, 1.0, (300, 16)))
  fake = np.abs(rng.normal(3.0, 1.0, (250, 16)) * 0.9 + 0.1)
  real, fake = real.astype(np.float32), fake.astype(np.float32)
  got = pr.precision_recall(real, fake, k=k, batch_size=batch)
  want = _reference(real.astype(np.float64), fake.astype(np.float64), k)
  assert got == pytest.approx(want, abs=1e-12)
  assert 0.05 < got["precision"] < 0.95 and 0.05 < got["recall"] < 0.95  # not a trivial case
  # The radii themselves, against a k-d tree (k + 1 neighbours: the first is the point).
  r2 = pr.knn_squared_radii(real, k=k, batch_size=batch)
  dist, _ = cKDTree(real.astype(np.float64)).query(real.astype(np.float64), k=k + 1)
  np.testing.assert_allclose(np.sqrt(r2), dist[:, k], rtol=1e-4)


def test_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 16)).astype(np.float32)
  assert pr.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
  assert pr.precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}
  # Points 0..9 on a line. k = 3: inner radii 2, the two ends 3, so a fake at 12 (3 from the end 9)
  # is inside (the boundary counts), 12.5 is outside, 4.5 is inside.
  e = np.zeros((1, 8), np.float32)
  e[0, 3] = 1.0
  real = np.arange(10, dtype=np.float32)[:, None] * e
  fake = np.asarray([12.0, 12.5, 4.5], np.float32)[:, None] * e
  np.testing.assert_array_equal(pr.knn_squared_radii(real, k=3),
                                [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
  inside = pr.inside_manifold(fake, real, pr.knn_squared_radii(real, k=3))
  np.testing.assert_array_equal(inside, [True, False, True])
  # k = 2: real radii 1 inside, 2 at the ends, so only 4.5 is inside: precision 1/3. The fakes'
  # radii (2nd neighbour among 3) are 8, 7.5 and 8; every real point is within 8 of 4.5: recall 1.
  assert pr.precision_recall(real, fake, k=2) == {"precision": pytest.approx(1 / 3),
                                                  "recall": 1.0}


def test_batch_padding_does_not_change_results():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(37, 8)).astype(np.float32)
  fake = rng.normal(0.5, 1.0, size=(29, 8)).astype(np.float32)
  assert pr.precision_recall(real, fake, batch_size=5) == pr.precision_recall(real, fake,
                                                                              batch_size=64)


def test_bad_inputs():
  x = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="k=3 needs at least 4"):
    pr.precision_recall(x[:3], x)
  with pytest.raises(ValueError, match="real features are 4-d, fake ones 5-d"):
    pr.precision_recall(x, np.zeros((10, 5)))
  with pytest.raises(ValueError, match=r"expected \[N, D\]"):
    pr.knn_squared_radii(np.zeros(10))
