"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN manifolds of feature sets, in JAX.

  radius_k(phi, Phi) = distance from phi to its k-th nearest neighbour in Phi (itself excluded)
  inside(q, Phi)     = 1 if ||q - phi|| <= radius_k(phi, Phi) for some phi in Phi
  precision          = mean over fake features q of inside(q, real)   (samples that look real)
  recall             = mean over real features q of inside(q, fake)   (real data that is covered)

k = 3 on Inception pool features, as the paper; any features work. Distances are computed in row
batches as ||a||^2 - 2 a.b + ||b||^2 at full float32 matmul precision, after centring both sets on
the real mean (distances do not change, the squared norms shrink, fewer digits are lost). Memory:
one [batch_size, N] distance block at a time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 3
DEFAULT_BATCH = 1024


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distances between rows: a [n, D], b [m, D] -> [n, m] (>= 0)."""
  aa = jnp.sum(a * a, axis=1)[:, None]  # [n, 1]
  bb = jnp.sum(b * b, axis=1)[None, :]  # [1, m]
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)  # [n, m]
  return jnp.maximum(aa - 2.0 * ab + bb, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_block(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """Squared distance of each row to its k-th nearest point, counting itself as the 0-th."""
  d = squared_distances(rows, points)  # [b, N]
  neg_smallest, _ = jax.lax.top_k(-d, k + 1)  # [b, k + 1], nearest first
  return -neg_smallest[:, k]  # [b]


@jax.jit
def _inside_block(rows: jax.Array, points: jax.Array, sq_radii: jax.Array) -> jax.Array:
  """Whether each row lies in at least one ball (point, radius): [b] bool."""
  d = squared_distances(rows, points)  # [b, N]
  return jnp.any(d <= sq_radii[None, :], axis=1)


def _row_blocks(x: np.ndarray, batch_size: int):
  """Fixed-size row blocks (the last zero-padded, so one compilation) and each block's real size."""
  for start in range(0, x.shape[0], batch_size):
    block = x[start:start + batch_size]
    n = block.shape[0]
    if n < batch_size:
      block = np.concatenate([block, np.zeros((batch_size - n, x.shape[1]), x.dtype)])
    yield jnp.asarray(block), n


def _check_features(x, what: str, k: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{what}: features of shape {x.shape}; expected [N, D].")
  if x.shape[0] <= k:
    raise ValueError(f"{what}: {x.shape[0]} features; k={k} needs at least {k + 1}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: the features contain NaN or Inf.")
  return x


def knn_squared_radii(features: np.ndarray, k: int = DEFAULT_K,
                      batch_size: int = DEFAULT_BATCH) -> np.ndarray:
  """Squared k-NN radius of every feature within its own set: [N, D] -> [N] float32."""
  if k < 1:
    raise ValueError(f"k={k}: expected >= 1.")
  features = _check_features(features, "knn_squared_radii", k)
  batch_size = min(batch_size, features.shape[0])
  points = jnp.asarray(features)
  out = [np.asarray(_kth_neighbour_block(block, points, k))[:n]
         for block, n in _row_blocks(features, batch_size)]
  return np.concatenate(out)


def inside_manifold(queries: np.ndarray, points: np.ndarray, sq_radii: np.ndarray,
                    batch_size: int = DEFAULT_BATCH) -> np.ndarray:
  """Whether each query [M, D] lies within the k-NN balls of `points` [N, D]: [M] bool."""
  queries = np.asarray(queries, np.float32)
  batch_size = min(batch_size, queries.shape[0])
  pts, r2 = jnp.asarray(points, jnp.float32), jnp.asarray(sq_radii, jnp.float32)
  out = [np.asarray(_inside_block(block, pts, r2))[:n]
         for block, n in _row_blocks(queries, batch_size)]
  return np.concatenate(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K,
                     batch_size: int = DEFAULT_BATCH) -> dict[str, float]:
  """{'precision', 'recall'} of fake features [M, D] against real features [N, D]."""
  real = _check_features(real, "precision_recall: real", k)
  fake = _check_features(fake, "precision_recall: fake", k)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: real features are {real.shape[1]}-d, fake ones "
                     f"{fake.shape[1]}-d; expected the same feature space.")
  center = real.mean(axis=0, keepdims=True)  # [1, D]
  real, fake = real - center, fake - center
  real_r2 = knn_squared_radii(real, k, batch_size)  # [N]
  fake_r2 = knn_squared_radii(fake, k, batch_size)  # [M]
  precision = inside_manifold(fake, real, real_r2, batch_size).mean()
  recall = inside_manifold(real, fake, fake_r2, batch_size).mean()
  return {"precision": float(precision), "recall": float(recall)}
