"""Encode a dataset once into sharded latents, then train the diffusion model on those.

    build_latent_cache(loader_or_source, encode_fn, out_dir, shard_size=1024)
    source = LatentCacheSource(out_dir)   # records: latents float32 [h, w, c], label, caption, ...

Layout of `out_dir`: `shard-00000.npz`, `shard-00001.npz`, ... (uncompressed numpy archives with one
array per key, leading axis = examples) and `index.json` ({"version", "num_examples", "shards":
[{"file", "count"}], "keys", "latent_shape", "latent_dtype"}). The index is written last, so a cache
interrupted mid-way is never mistaken for a complete one. Latents are stored as the encoder returns
them (e.g. the posterior *sample* times the scale factor, or the raw moments if you prefer to sample
per epoch: that choice belongs to `encode_fn`).

CLI: `python -m ldm_jax.cli.latent_cache --checkpoint CKPT --data shapes --out_dir DIR`.
"""

import collections
import json
import os
from typing import Any, Callable, Iterable

import numpy as np

from ldm_jax.data import transforms

INDEX_FILE = "index.json"
CACHE_VERSION = 1
_PASSTHROUGH_KEYS = ("label", "caption", "boxes", "box_labels", "box_mask", "segmentation")


def _batches_from_source(source, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
  """Sequential, unshuffled batches of a random-access source, uint8 images made [-1, 1] floats."""
  n = len(source)
  for start in range(0, n, batch_size):
    records = [source[i] for i in range(start, min(n, start + batch_size))]
    batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    if batch["image"].dtype == np.uint8:
      batch["image"] = transforms.to_float(batch["image"])  # [B, H, W, 3]
    yield batch


def build_latent_cache(data, encode_fn: Callable[[np.ndarray], Any], out_dir: str,
                       shard_size: int = 1024, *, batch_size: int = 32,
                       text_encode_fn: Callable[[list[str]], Any] | None = None,
                       max_examples: int | None = None, keep_keys=_PASSTHROUGH_KEYS) -> dict:
  """Encodes `data` into `out_dir` and returns the index dict.

  Args:
    data: a random-access source (read in order, in batches of `batch_size`) or any iterable of
      batches such as a finite loader (`make_loader(..., num_epochs=1, shuffle=False)`): dicts with
      'image' float32 [B, H, W, 3] in [-1, 1].
    encode_fn: image batch float32 [B, H, W, 3] -> latents [B, h, w, c] (numpy or jax array).
    out_dir: created if needed; must not already hold a cache.
    shard_size: examples per .npz shard.
    batch_size: batch size when `data` is a source.
    text_encode_fn: optional captions (list of B str) -> embeddings [B, L, D], stored as 'text_emb'.
    max_examples: stop after this many examples (required to stop an infinite loader).
    keep_keys: batch keys copied next to the latents when present.
  """
  if shard_size <= 0:
    raise ValueError(f"shard_size={shard_size}; expected a positive number of examples per shard")
  if os.path.exists(os.path.join(out_dir, INDEX_FILE)):
    raise FileExistsError(f"{out_dir} already holds a latent cache ({INDEX_FILE}); "
                          "choose another out_dir or delete it")
  os.makedirs(out_dir, exist_ok=True)
  # Lists of batches and iterators are batches; anything else indexable is a source of records.
  is_source = (hasattr(data, "__getitem__") and hasattr(data, "__len__")
               and not isinstance(data, (list, tuple)))
  batches = _batches_from_source(data, batch_size) if is_source else data

  shards, pending = [], collections.defaultdict(list)
  num_pending = total = 0
  latent_shape = latent_dtype = None

  def flush(count: int):
    nonlocal num_pending
    arrays = {k: np.concatenate(v)[:count] for k, v in pending.items()}
    rest = {k: np.concatenate(v)[count:] for k, v in pending.items()}
    name = f"shard-{len(shards):05d}.npz"
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
      np.savez(f, **arrays)
    os.replace(tmp, os.path.join(out_dir, name))
    shards.append({"file": name, "count": count})
    pending.clear()
    for k, v in rest.items():
      if len(v):
        pending[k].append(v)
    num_pending -= count

  for batch in batches:
    if max_examples is not None and total >= max_examples:
      break
    take = len(batch["image"])
    if max_examples is not None:
      take = min(take, max_examples - total)
    latents = np.asarray(encode_fn(np.asarray(batch["image"][:take], np.float32)))
    if latents.shape[0] != take:
      raise ValueError(f"encode_fn returned latents of shape {latents.shape} for {take} images; "
                       "expected the batch size first")
    latent_shape, latent_dtype = list(latents.shape[1:]), str(latents.dtype)
    pending["latents"].append(latents)
    for k in keep_keys:
      if k in batch:
        pending[k].append(np.asarray(batch[k])[:take])
    if text_encode_fn is not None:
      captions = [str(c) for c in np.asarray(batch["caption"])[:take]]
      pending["text_emb"].append(np.asarray(text_encode_fn(captions)))
    num_pending += take
    total += take
    while num_pending >= shard_size:
      flush(shard_size)
  if num_pending:
    flush(num_pending)
  if total == 0:
    raise ValueError("build_latent_cache got no examples from `data`")

  index = {"version": CACHE_VERSION, "num_examples": total, "shards": shards,
           "keys": _stored_keys(out_dir, shards[0]["file"]),
           "latent_shape": latent_shape, "latent_dtype": latent_dtype}
  tmp = os.path.join(out_dir, INDEX_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
  return index


def _stored_keys(out_dir: str, shard_file: str) -> list[str]:
  with np.load(os.path.join(out_dir, shard_file)) as z:
    return sorted(z.files)


class LatentCacheSource:
  """Random-access source over a cache written by `build_latent_cache`.

  Records: latents [h, w, c] plus the stored per-example keys (label, caption, text_emb, ...).
  Shards are loaded whole on first use and the `cache_shards` most recent are kept in memory.
  """

  def __init__(self, out_dir: str, cache_shards: int = 4):
    path = os.path.join(out_dir, INDEX_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no latent cache index at {path}; build one with "
                              "build_latent_cache or `python -m ldm_jax.cli.latent_cache`")
    with open(path) as f:
      self.index = json.load(f)
    if self.index.get("version") != CACHE_VERSION:
      raise ValueError(f"{path}: version {self.index.get('version')!r}; expected {CACHE_VERSION}")
    self.out_dir = os.path.abspath(out_dir)
    self._ends = np.cumsum([s["count"] for s in self.index["shards"]])  # [num_shards]
    self._cache_shards = cache_shards
    self._loaded: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_loaded"] = collections.OrderedDict()  # workers load their own shards
    return state

  def __len__(self) -> int:
    return int(self.index["num_examples"])

  def _shard(self, s: int) -> dict[str, np.ndarray]:
    if s in self._loaded:
      self._loaded.move_to_end(s)
      return self._loaded[s]
    with np.load(os.path.join(self.out_dir, self.index["shards"][s]["file"])) as z:
      arrays = {k: z[k] for k in z.files}
    self._loaded[s] = arrays
    while len(self._loaded) > self._cache_shards:
      self._loaded.popitem(last=False)
    return arrays

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a latent cache of {len(self)} examples")
    s = int(np.searchsorted(self._ends, index, side="right"))
    offset = index - (int(self._ends[s - 1]) if s else 0)
    record = {k: v[offset] for k, v in self._shard(s).items()}
    if "caption" in record:
      record["caption"] = str(record["caption"])
    return record

  def __repr__(self) -> str:
    return f"LatentCacheSource(out_dir={self.out_dir!r}, num_examples={len(self)})"
