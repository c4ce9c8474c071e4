"""Inception Score against closed forms and two independent computations (numpy as the TF code,
torch as torch-fidelity)."""

import numpy as np
import pytest
import torch

from ldm_jax.eval import inception_score as is_lib


def _openai_numpy(logits: np.ndarray, splits: int) -> tuple[float, float]:
  """The improved-gan code's loop: softmax, then per split exp(mean KL(p(y|x) || p(y)))."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores)), float(np.std(scores))


def _torch_fidelity_style(logits: np.ndarray, splits: int) -> tuple[float, float]:
  """torch.chunk-free torch version with log-softmax; splits by the same boundaries."""
  t = torch.as_tensor(logits, dtype=torch.float64)
  log_p = torch.log_softmax(t, dim=1)
  p = log_p.exp()
  n = t.shape[0]
  scores = []
  for i in range(splits):
    a, b = i * n // splits, (i + 1) * n // splits
    log_m = torch.log(p[a:b].mean(0, keepdim=True))
    scores.append((p[a:b] * (log_p[a:b] - log_m)).sum(1).mean().exp())
  s = torch.stack(scores)
  return float(s.mean()), float(s.std(unbiased=False))


@pytest.mark.parametrize("n,k,splits", [(103, 1008, 10), (40, 17, 3), (9, 5, 1)])
def test_matches_independent_implementations(n, k, splits):
  rng = np.random.default_rng(n)
  logits = rng.normal(0, 3, (n, k)) + rng.normal(0, 2, (1, k))  # peaked, unequal classes
  got = is_lib.inception_score(logits.astype(np.float32), splits=splits)
  ref_np = _openai_numpy(logits.astype(np.float32).astype(np.float64), splits)
  ref_torch = _torch_fidelity_style(logits.astype(np.float32), splits)
  np.testing.assert_allclose(got, ref_np, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got, ref_torch, rtol=1e-10, atol=1e-12)
  assert got[0] > 1.5  # Not a degenerate case.


def test_closed_forms():
  k = 50
  # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1.
  same = np.tile(np.random.default_rng(0).normal(size=(1, k)), (12, 1))
  assert is_lib.inception_score(same, splits=3) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident predictions over m equally used classes: IS = exp(H(p(y))) = m.
  m = 8
  labels = np.arange(40) % m
  onehot = 60.0 * np.eye(k)[labels]  # e^-60: the other classes are numerically absent
  assert is_lib.inception_score(onehot, splits=1)[0] == pytest.approx(m, rel=1e-9)
  # Two splits of 10: one of identical predictions (IS 1), one of 10 distinct classes (IS 10).
  mixed = np.concatenate([same[:1].repeat(10, 0), 60.0 * np.eye(k)[np.arange(10)]])
  mean, std = is_lib.inception_score(mixed, splits=2)
  assert mean == pytest.approx(5.5, rel=1e-9) and std == pytest.approx(4.5, rel=1e-9)


def test_bad_inputs():
  with pytest.raises(ValueError, match="splits=11 for 10 samples"):
    is_lib.inception_score(np.zeros((10, 5)), splits=11)
  with pytest.raises(ValueError, match=r"expected \[N, K >= 2\]"):
    is_lib.inception_score(np.zeros((10,)))
  bad = np.zeros((4, 5))
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    is_lib.inception_score(bad, splits=2)
