"""Frechet Inception Distance: Inception features on devices, statistics and the distance on host.

  params = load_inception_params("fid_inception.npz")        # ldm_jax.convert.inception
  extractor = InceptionFeatureExtractor(params, batch_size=100)
  score = fid(samples_uint8, "tfds:celeb_a_hq/256:train", extractor, cache_dir="fid_stats")

Numerics follow pytorch-fid 0.3.0: features are the 2048-d pool of the FID Inception on
uint8 / 255 images resized to 299x299; statistics are the float64 mean and the unbiased covariance
(`np.cov`, ddof 1). The distance's trace term tr((S1 S2)^(1/2)) is taken by symmetric
eigen-decompositions by default (the same value as pytorch-fid's `scipy.linalg.sqrtm`, several
times faster, and an N x N problem when only N < 2048 samples are given); `method='sqrtm'`
reproduces pytorch-fid step by step, including its `eps * I` retry for singular products. Statistics files are .npz with keys `mu` and `sigma`, so
pytorch-fid's precomputed files load here and ours load there.

Feature extraction runs one jitted function per image size. Images are batched by size (output
order is the input order), the last batch of each size is zero-padded, and with several local
devices the batch is split over a 'data' mesh while the weights are replicated.
"""

import hashlib
import itertools
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from ldm_jax import parallel
from ldm_jax.convert.common import flatten
from ldm_jax.data.folder import IMAGE_EXTENSIONS, ImageFolderSource
from ldm_jax.data.tfds_source import TfdsSource
from ldm_jax.data.transforms import crop_offsets, resize_shorter
from ldm_jax.eval.inception import FIDInceptionV3, preprocess

log = logging.getLogger(__name__)

OUTPUTS = ("pool", "logits", "logits_unbiased")


# ---------------------------------------------------------------- statistics and the distance ----
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features of shape {features.shape}; expected [N, D] with N >= 2 images")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, through two symmetric eigen-decompositions.

  S1 S2 is similar to sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so the trace is the sum of the
  square roots of its eigenvalues. Seconds for D = 2048, where scipy's sqrtm takes tens.
  """
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # [D, D] = sqrt(S1)
  middle = root1 @ s2 @ root1  # [D, D]
  lam = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrised against rounding
  return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def _trace_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
  """tr(sqrtm(S1 S2)) exactly as pytorch-fid computes it (scipy sqrtm, eps fallback)."""
  covmean = linalg.sqrtm(s1 @ s2)  # [D, D], complex when rounding makes eigenvalues negative
  if not np.all(np.isfinite(covmean)):
    log.warning("frechet_distance: S1 S2 is singular; adding %g to the covariance diagonals", eps)
    offset = eps * np.eye(s1.shape[0])
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
    if worst > 1e-3:
      raise ValueError(f"frechet_distance: sqrt(S1 S2) has imaginary diagonal parts up to "
                       f"{worst:g} (expected ~0): the covariances are not valid statistics")
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_low_rank(features1: np.ndarray, s2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) when S1 = cov(features1) from N <= D rows: an N x N eigenproblem.

  With A the centred features [N, D] and S1 = A^T A / (N - 1), the non-zero eigenvalues of S1 S2
  are those of A S2 A^T / (N - 1) (symmetric PSD, [N, N]).
  """
  a = np.asarray(features1, np.float64)
  a = a - a.mean(axis=0)  # [N, D]
  small = a @ s2 @ a.T / (a.shape[0] - 1)  # [N, N]
  lam = np.linalg.eigvalsh((small + small.T) / 2)
  return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


FRECHET_METHODS = ("eigh", "sqrtm")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh",
                     features1=None) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians, in float64.

  method='eigh' (default) takes the trace through symmetric eigen-decompositions (exact for
  covariance matrices, and ~10x faster than sqrtm at D = 2048); method='sqrtm' reproduces
  pytorch-fid step by step: scipy's sqrtm, and when S1 S2 is singular (non-finite square root)
  `eps * I` added to both covariances; an imaginary diagonal above 1e-3 raises ValueError.
  features1 (optional, method 'eigh'): the [N, D] features that (mu1, sigma1) were computed from;
  with N < D the trace then takes an N x N eigenproblem instead of D x D ones.
  """
  if method not in FRECHET_METHODS:
    raise ValueError(f"frechet_distance: method={method!r}; expected one of {FRECHET_METHODS}")
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", s1, (d, d)),
                             ("sigma2", s2, (d, d))):
    if value.shape != shape:
      raise ValueError(f"frechet_distance: {name} has shape {value.shape}; expected {shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"frechet_distance: {name} holds non-finite values")
  diff = mu1 - mu2  # [D]
  if method == "sqrtm":
    trace_root = _trace_sqrtm(s1, s2, eps)
  elif features1 is not None and len(features1) < d:
    if np.shape(features1)[1:] != (d,):
      raise ValueError(f"frechet_distance: features1 has shape {np.shape(features1)}; expected "
                       f"[N, {d}]")
    trace_root = _trace_sqrt_product_low_rank(features1, s2)
  else:
    trace_root = _trace_sqrt_product(s1, s2)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_root)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
  """Writes pytorch-fid style statistics (`mu`, `sigma`; extra keys are ignored by readers)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"  # atomic: a crashed run never leaves half a cache file
  np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
  os.replace(tmp, path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) float64 from a .npz holding `mu` and `sigma` (ours or pytorch-fid's)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
  try:
    with np.load(path) as data:
      if "mu" not in data.files or "sigma" not in data.files:
        raise ValueError(f"FID statistics file {path!r} holds {sorted(data.files)}; expected the "
                         "keys 'mu' and 'sigma'")
      mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  except (OSError, EOFError) as e:
    raise ValueError(f"FID statistics file {path!r} is not a readable .npz ({e})") from None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"FID statistics file {path!r}: mu {mu.shape}, sigma {sigma.shape}; expected "
                     "[D] and [D, D]")
  return mu, sigma


# ---------------------------------------------------------------- feature extraction -------------
def _check_image(i: int, image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"image {i}: shape {image.shape}, dtype {image.dtype}; expected uint8 "
                     "[H, W, 3] RGB in 0..255 (float images: np.rint(x * 255).astype(np.uint8))")
  return image


class InceptionFeatureExtractor:
  """Batched, jitted FID Inception over uint8 images, sharded when there are several local devices.

  Args:
    params: the FIDInceptionV3 parameter tree (see `ldm_jax.convert.inception`).
    batch_size: images per device call; rounded up to a multiple of the batch shards.
    mesh: a mesh whose ('data', 'fsdp') axes split the batch. None: one 'data' axis over all local
      devices (plain single-device jit when there is one).
    dtype: compute dtype of the network (float32 for reported numbers).
  """

  def __init__(self, params: Any, *, batch_size: int = 50, mesh=None, dtype=jnp.float32):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if mesh is None and jax.local_device_count() > 1:
      mesh = parallel.make_mesh({"data": -1}, devices=jax.local_devices())
    self.mesh = mesh
    shards = 1 if mesh is None else int(np.prod(
        [mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.axis_names]))
    self.batch_size = -(-int(batch_size) // shards) * shards
    self._host_params = params
    self._fingerprint = None
    model = FIDInceptionV3(dtype=dtype)

    def forward(p, images):  # images: uint8 [B, H, W, 3]
      return model.apply({"params": p}, preprocess(images))  # {name: [B, D]}

    if mesh is None:
      self._put = jax.device_put
      self.params = jax.device_put(params)
      self._forward = jax.jit(forward)
    else:
      data = parallel.batch_sharding(mesh)
      self._put = lambda x: jax.device_put(x, data)
      self.params = jax.device_put(params, parallel.replicated(mesh))
      self._forward = jax.jit(forward, in_shardings=(parallel.replicated(mesh), data),
                              out_shardings=data)

  @property
  def fingerprint(self) -> str:
    """Identifies the weights (for cache keys); computed once."""
    if self._fingerprint is None:
      self._fingerprint = params_fingerprint(self._host_params)
    return self._fingerprint

  def __call__(self, images: Iterable, *, outputs: Sequence[str] = ("pool",),
               max_images: int | None = None) -> dict[str, np.ndarray]:
    """Features of uint8 images, in input order.

    Args:
      images: uint8 [N, H, W, 3] array, or an iterable of uint8 [H, W, 3] arrays (sizes may differ;
        each distinct size compiles once).
      outputs: any of 'pool' [N, 2048], 'logits' [N, 1008], 'logits_unbiased' [N, 1008].
      max_images: stop after this many images.
    Returns:
      {name: float32 numpy [N, D]}.
    """
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
      raise ValueError(f"outputs={tuple(outputs)}; expected a non-empty subset of {OUTPUTS}")
    pieces: list[tuple[np.ndarray, dict]] = []  # (input indices, host outputs), by batch
    in_flight: list[tuple[np.ndarray, dict]] = []  # one batch on the device while the host reads
    buffers: dict[tuple, tuple[list, list]] = {}

    def fetch():
      for idx, out in in_flight:
        pieces.append((idx, {o: np.asarray(out[o])[:len(idx)] for o in outputs}))
      in_flight.clear()

    def launch(shape):
      idx, imgs = buffers.pop(shape)
      batch = np.zeros((self.batch_size,) + shape, np.uint8)  # [B, H, W, 3], zero padded
      batch[:len(imgs)] = np.stack(imgs)
      out = self._forward(self.params, self._put(batch))  # asynchronous dispatch
      fetch()  # the previous batch's results, while this one runs
      in_flight.append((np.asarray(idx), {o: out[o] for o in outputs}))

    count = 0
    for i, image in enumerate(itertools.islice(images, max_images)):
      image = _check_image(i, image)
      idx, imgs = buffers.setdefault(image.shape, ([], []))
      idx.append(i)
      imgs.append(image)
      count += 1
      if len(imgs) == self.batch_size:
        launch(image.shape)
    for shape in list(buffers):
      launch(shape)
    fetch()
    dims = {"pool": 2048, "logits": 1008, "logits_unbiased": 1008}
    if not pieces:
      return {o: np.zeros((0, dims[o]), np.float32) for o in outputs}
    order = np.argsort(np.concatenate([idx for idx, _ in pieces]), kind="stable")
    assert len(order) == count
    return {o: np.concatenate([p[o] for _, p in pieces])[order] for o in outputs}


def params_fingerprint(params: Any) -> str:
  """sha1 over the parameter names and float32 bytes: 16 hex characters."""
  digest = hashlib.sha1()
  for path, leaf in sorted(flatten(params).items()):
    digest.update("/".join(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return digest.hexdigest()[:16]


# ---------------------------------------------------------------- statistics of sources ----------
def statistics_of_images(images: Iterable, extractor: InceptionFeatureExtractor,
                         max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the pool features of uint8 images (array or iterable, see the extractor)."""
  return feature_statistics(extractor(images, max_images=max_images)["pool"])


def _cached(cache_dir: str | None, key_parts: dict,
            compute: Callable[[], tuple[np.ndarray, np.ndarray, int]]):
  """Loads `<cache_dir>/fid_stats_<hash of key_parts>.npz`, or computes and writes it."""
  if cache_dir is None:
    mu, sigma, _ = compute()
    return mu, sigma
  key = hashlib.sha1(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f"fid_stats_{key}.npz")
  if os.path.isfile(path):
    log.info("FID statistics for %s from the cache %s", key_parts.get("source"), path)
    return load_stats(path)
  mu, sigma, n = compute()
  save_stats(path, mu, sigma, num_images=n, key=json.dumps(key_parts, sort_keys=True))
  log.info("FID statistics of %d images for %s cached in %s", n, key_parts.get("source"), path)
  return mu, sigma


def _source_images(source, image_size: int | None, max_images: int | None):
  """uint8 images of a random-access source (records with 'image'), optionally resized and centre
  cropped to image_size x image_size like the training pipeline."""
  n = len(source) if max_images is None else min(len(source), int(max_images))
  for i in range(n):
    image = source[i]["image"]
    if image_size is not None:
      image = resize_shorter(image, image_size)  # [H', W', 3]
      top, left = crop_offsets(image.shape[0], image.shape[1], image_size, None)
      image = image[top:top + image_size, left:left + image_size]  # [S, S, 3]
    yield image


def _stats_of_source(source, extractor, image_size, max_images):
  features = extractor(_source_images(source, image_size, max_images))["pool"]  # [N, 2048]
  return (*feature_statistics(features), len(features))


def _folder_listing(root: str) -> list:
  """(relative path, size, mtime) of every image under root, so edits invalidate the cache."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        st = os.stat(os.path.join(dirpath, name))
        out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
  return out


def statistics_of_folder(root: str, extractor: InceptionFeatureExtractor, *,
                         max_images: int | None = None, image_size: int | None = None,
                         cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the images under `root` (jpg/png/webp, recursive, sorted order)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} is not a directory")
  listing = hashlib.sha1(json.dumps(_folder_listing(root)).encode()).hexdigest()
  key = {"source": f"folder:{os.path.abspath(root)}", "files": listing, "max_images": max_images,
         "image_size": image_size, "weights": extractor.fingerprint}
  compute = lambda: _stats_of_source(ImageFolderSource(root, verify=False), extractor, image_size,
                                     max_images)
  return _cached(cache_dir, key, compute)


def statistics_of_tfds(name: str, split: str, extractor: InceptionFeatureExtractor, *,
                       data_dir: str | None = None, image_key: str = "image",
                       max_images: int | None = None, image_size: int | None = None,
                       cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a prepared TFDS split (ArrayRecord, see ldm_jax.data.tfds_source)."""
  key = {"source": f"tfds:{name}:{split}", "data_dir": data_dir and os.path.abspath(data_dir),
         "image_key": image_key, "max_images": max_images, "image_size": image_size,
         "weights": extractor.fingerprint}
  compute = lambda: _stats_of_source(TfdsSource(name, split, data_dir, image_key=image_key),
                                     extractor, image_size, max_images)
  return _cached(cache_dir, key, compute)


def reference_statistics(spec: str, extractor: InceptionFeatureExtractor, *,
                         max_images: int | None = None, image_size: int | None = None,
                         cache_dir: str | None = None,
                         data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) for a spec: a statistics .npz, an image folder, or 'tfds:NAME[:SPLIT]'."""
  spec = os.fspath(spec)
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    if not name:
      raise ValueError(f"FID source {spec!r}: expected 'tfds:NAME[:SPLIT]', e.g. "
                       "'tfds:cifar10:test'")
    return statistics_of_tfds(name, split or "train", extractor, data_dir=data_dir,
                              max_images=max_images, image_size=image_size, cache_dir=cache_dir)
  if spec.endswith(".npz"):
    return load_stats(spec)
  if os.path.isdir(spec):
    return statistics_of_folder(spec, extractor, max_images=max_images, image_size=image_size,
                                cache_dir=cache_dir)
  raise ValueError(f"FID source {spec!r}: expected a statistics .npz file, an image folder or "
                   "'tfds:NAME[:SPLIT]' (no such file or folder)")


def fid(samples, reference, extractor: InceptionFeatureExtractor, *,
        max_images: int | None = None, image_size: int | None = None,
        cache_dir: str | None = None, data_dir: str | None = None) -> float:
  """FID between two image sets, each a uint8 [N, H, W, 3] array or a `reference_statistics` spec.

  max_images and image_size apply to specs (folders, TFDS); arrays are used as given.
  """
  def stats(x):
    if isinstance(x, (str, os.PathLike)):
      return reference_statistics(x, extractor, max_images=max_images, image_size=image_size,
                                  cache_dir=cache_dir, data_dir=data_dir)
    return statistics_of_images(x, extractor)

  return frechet_distance(*stats(samples), *stats(reference))
