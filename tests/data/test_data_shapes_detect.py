"""The shapes detector: exact on clean renders, robust to blur and noise, and able to say no."""

import numpy as np
import pytest
from scipy import ndimage

from ldm_jax.data import shapes
from ldm_jax.data import shapes_detect as sd


def _renders(seed, n, num_objects, size=64):
  exs = [shapes.render_shapes(seed, i, size, num_objects) for i in range(n)]
  return [e["image"] for e in exs], [e["caption"] for e in exs], exs


def _degrade(images, sigma, noise, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for im in images:
    x = ndimage.gaussian_filter(im.astype(np.float64), (sigma, sigma, 0))
    out.append(np.clip(np.rint(x + rng.normal(0, noise, im.shape)), 0, 255).astype(np.uint8))
  return out


@pytest.mark.parametrize("num_objects", [1, 2])
def test_clean_renders_are_all_matched(num_objects):
  images, captions, exs = _renders(11, 60, num_objects)
  assert sd.match_rate(images, captions) == 1.0
  # The detected boxes are the rendered ones.
  for im, ex in zip(images[:10], exs[:10]):
    found = sorted(sd.detect_shapes(im), key=lambda o: o["box"])
    want = sorted(ex["boxes"].tolist())
    assert len(found) == len(want)
    for o, b in zip(found, want):
      np.testing.assert_allclose(o["box"], b, atol=1.5 / 64)


def test_clean_renders_at_other_sizes():
  images, captions, _ = _renders(12, 30, 1, size=32)
  assert sd.match_rate(images, captions) == 1.0
  images, captions, _ = _renders(12, 10, 2, size=128)
  assert sd.match_rate(images, captions) == 1.0


@pytest.mark.parametrize("num_objects,sigma,noise,minimum", [
    (1, 1.0, 10.0, 0.95), (1, 1.5, 15.0, 0.95), (2, 1.5, 15.0, 0.9)])
def test_blurred_noisy_renders(num_objects, sigma, noise, minimum):
  images, captions, _ = _renders(13, 60, num_objects)
  assert sd.match_rate(_degrade(images, sigma, noise), captions) >= minimum


def test_mismatches_are_detected():
  images, captions, exs = _renders(14, 20, 1)
  # Change the colour / shape / position named by each caption: nothing may match.
  wrong = []
  for i, ex in enumerate(exs):
    c, s, p = int(ex["colors"][0]), int(ex["shapes"][0]), int(ex["positions"][0])
    k = i % 3
    wrong.append(shapes.caption_for((c + 1) % 6 if k == 0 else c, (s + 1) % 3 if k == 1 else s,
                                    (p + 1) % 5 if k == 2 else p))
  assert sd.match_rate(images, wrong) == 0.0
  blank = np.full((64, 64, 3), 255, np.uint8)
  assert sd.detect_shapes(blank) == []
  assert sd.match_rate([blank], [captions[0]]) == 0.0
  # Strict mode rejects an extra object; the lenient mode accepts it.
  two = shapes.render_shapes(15, 0, 64, num_objects=2)
  first = two["caption"].split(" and ")[0]
  assert not sd.sample_matches(two["image"], first)
  assert sd.sample_matches(two["image"], first, strict=False)


def test_parse_caption_and_errors():
  assert sd.parse_caption("a red circle at the top left and a blue square at the center") == [
      ("red", "circle", "top left"), ("blue", "square", "center")]
  with pytest.raises(ValueError, match="names no object"):
    sd.parse_caption("a cat")
  with pytest.raises(ValueError, match="expected uint8"):
    sd.detect_shapes(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="2 images but 1 captions"):
    sd.match_rate(np.zeros((2, 8, 8, 3), np.uint8), ["a red circle at the center"])
