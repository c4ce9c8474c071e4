"""Inception Score (Salimans et al. 2016) from classifier logits, with the usual splits.

  p(y|x)  = softmax(logits)                                   # [N, K]
  split s = the samples [s*N//S, (s+1)*N//S) in order, s = 0..S-1
  IS_s    = exp( mean_{x in s} KL( p(y|x) || mean_{x' in s} p(y|x') ) )
  IS      = mean_s IS_s, reported with std_s IS_s (population std, ddof=0)

This is the original TF code's computation (openai/improved-gan) and torch-fidelity's. The paper's
numbers come from the FID Inception's 1008 logits WITHOUT the fc bias (pool features @ fc weight),
the TF code's `softmax/logits/MatMul`: `ldm_jax.eval.inception` returns them as 'logits_unbiased'.
Computed in float64 numpy: N x K values, no accelerator needed.
"""

import numpy as np
from scipy import special

DEFAULT_SPLITS = 10


def split_bounds(n: int, splits: int) -> list[tuple[int, int]]:
  """[start, end) of each split, the TF code's `i * n // splits` boundaries."""
  return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def split_score(log_p: np.ndarray) -> float:
  """exp of the mean KL(p(y|x) || p(y)) over one split; log_p: [n, K] log-probabilities."""
  log_marginal = special.logsumexp(log_p, axis=0) - np.log(log_p.shape[0])  # [K] log mean_x p
  kl = np.sum(np.exp(log_p) * (log_p - log_marginal[None]), axis=1)  # [n]
  return float(np.exp(np.mean(kl)))


def inception_score(logits: np.ndarray, splits: int = DEFAULT_SPLITS) -> tuple[float, float]:
  """(mean, std) of the Inception Score over `splits` splits of logits [N, K]."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(f"inception_score: logits of shape {logits.shape}; expected [N, K >= 2].")
  n = logits.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f"inception_score: splits={splits} for {n} samples; expected "
                     f"1 <= splits <= {n}.")
  if not np.all(np.isfinite(logits)):
    raise ValueError("inception_score: the logits contain NaN or Inf.")
  log_p = special.log_softmax(logits, axis=1)  # [N, K]
  scores = np.asarray([split_score(log_p[a:b]) for a, b in split_bounds(n, splits)])  # [S]
  return float(np.mean(scores)), float(np.std(scores))
