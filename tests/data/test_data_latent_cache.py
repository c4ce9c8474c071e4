"""The latent cache: shards + index written once, read back exactly, usable as a loader source."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ldm_jax.data import latent_cache as lc
from ldm_jax.data import loader
from ldm_jax.data import shapes


def _encode(images):
  """A stand-in encoder: 4x4 mean pooling to 2 channels, [B, H, W, 3] -> [B, H/4, W/4, 2]."""
  b, h, w, _ = images.shape
  pooled = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4))
  return np.stack([pooled[..., 0] - pooled[..., 2], pooled[..., 1]], -1).astype(np.float32)


def _text(captions):
  return np.array([[len(c), c.count(" ")] for c in captions], np.float32)[:, None, :]  # [B, 1, 2]


def test_build_and_read_back_from_a_source(tmp_path):
  src = shapes.ShapesSource(seed=2, size=16, length=10)
  out = str(tmp_path / "cache")
  index = lc.build_latent_cache(src, _encode, out, shard_size=4, batch_size=3,
                                text_encode_fn=_text)
  assert index["num_examples"] == 10 and [s["count"] for s in index["shards"]] == [4, 4, 2]
  assert index["latent_shape"] == [4, 4, 2]
  assert sorted(os.listdir(out)) == ["index.json", "shard-00000.npz", "shard-00001.npz",
                                     "shard-00002.npz"]
  with open(os.path.join(out, "index.json")) as f:
    assert json.load(f) == index
  cache = lc.LatentCacheSource(out, cache_shards=1)
  assert len(cache) == 10
  for i in [0, 3, 4, 9, 5, 1]:  # out of order, across shards
    rec, ex = cache[i], src[i]
    image = ex["image"].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(rec["latents"], _encode(image[None])[0], rtol=0, atol=1e-6)
    assert rec["caption"] == ex["caption"] and rec["label"] == ex["label"]
    np.testing.assert_array_equal(rec["boxes"], ex["boxes"])
    np.testing.assert_array_equal(rec["text_emb"], _text([ex["caption"]])[0])
  with pytest.raises(IndexError):
    cache[10]
  with pytest.raises(FileExistsError, match="already holds a latent cache"):
    lc.build_latent_cache(src, _encode, out)


def test_build_from_a_loader_and_train_from_the_cache(tmp_path):
  src = shapes.ShapesSource(seed=2, size=16, length=64)
  it = loader.make_loader(src, batch_size=8, seed=1, process_index=0, process_count=1,
                          read_threads=1, read_buffer_size=8)  # infinite: max_examples stops it
  out = str(tmp_path / "cache")
  index = lc.build_latent_cache(it, _encode, out, shard_size=16, max_examples=20)
  assert index["num_examples"] == 20 and [s["count"] for s in index["shards"]] == [16, 4]
  cache = loader.make_dataset(name="latent_cache", root=out)
  batches = list(loader.make_loader(cache, batch_size=5, seed=0, num_epochs=1, process_index=0,
                                    process_count=1, read_threads=1, read_buffer_size=8))
  assert len(batches) == 4 and batches[0]["latents"].shape == (5, 4, 4, 2)
  # Every cached latent is the encoding of the source image named by its caption's position.
  rec = cache[7]
  matches = [i for i in range(64) if src[i]["caption"] == rec["caption"] and np.allclose(
      _encode(src[i]["image"][None].astype(np.float32) / 127.5 - 1.0)[0], rec["latents"])]
  assert matches


def test_missing_cache_and_cli_help(tmp_path):
  with pytest.raises(FileNotFoundError, match="no latent cache index"):
    lc.LatentCacheSource(str(tmp_path))
  with pytest.raises(ValueError, match="shard_size=0"):
    lc.build_latent_cache([], _encode, str(tmp_path / "x"), shard_size=0)
  with pytest.raises(ValueError, match="no examples"):
    lc.build_latent_cache([], _encode, str(tmp_path / "y"))
  res = subprocess.run([sys.executable, "-m", "ldm_jax.cli.latent_cache", "--help"],
                       capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert "--checkpoint" in res.stdout and "--out_dir" in res.stdout


def test_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path):
  res = subprocess.run([sys.executable, "-m", "ldm_jax.cli.latent_cache", "--checkpoint",
                        str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "cache"),
                        "--size", "16", "--length", "4"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert res.returncode == 2, res.stderr
  assert "--checkpoint" in res.stderr and "nothing" in res.stderr
  assert "Traceback" not in res.stderr
  assert not os.path.exists(tmp_path / "cache" / lc.INDEX_FILE)


def test_the_cache_library_does_not_import_the_model():
  """The cache takes its encoder as a function: importing it loads no LatentDiffusion."""
  code = ("import sys; import ldm_jax.data.latent_cache, ldm_jax.data.loader; "
          "print('ldm_jax.ldm' in sys.modules)")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert res.stdout.strip() == "False"
