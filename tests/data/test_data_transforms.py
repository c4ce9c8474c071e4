"""Transforms: crops and flips (with boxes measured back from pixels), SR pairs, masks, layouts."""

import numpy as np
import pytest

from ldm_jax.data import transforms as T


def _rect_image(h, w, box):
  """White image with a black rectangle at box = (x0, y0, x1, y1) in pixels."""
  img = np.full((h, w, 3), 255, np.uint8)
  x0, y0, x1, y1 = box
  img[y0:y1, x0:x1] = 0
  return img


def test_resize_crop_shapes_and_range():
  img = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
  assert T.resize_shorter(img, 20).shape == (20, 40, 3)
  assert T.resize_shorter(img, 40) is img
  out = T.ImageTransform(size=20)({"image": img})
  assert out["image"].shape == (20, 20, 3) and out["image"].dtype == np.float32
  assert T.crop_offsets(40, 80, 20, None) == (10, 30)
  np.testing.assert_array_equal(T.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  np.testing.assert_array_equal(T.to_uint8(T.to_float(img)), img)
  with pytest.raises(ValueError, match="cannot crop 50x50 from an image of 40x80"):
    T.crop_offsets(40, 80, 50, None)


def test_center_crop_is_the_middle():
  img = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
  out = T.ImageTransform(size=6)({"image": img})
  np.testing.assert_array_equal(T.to_uint8(out["image"]), img[:, 2:8])


@pytest.mark.parametrize("seed", range(6))
def test_boxes_follow_random_crop_and_flip(seed):
  box_px = (30, 10, 70, 30)  # in a 40 x 100 image
  img = _rect_image(40, 100, box_px)
  boxes = np.array([[30 / 100, 10 / 40, 70 / 100, 30 / 40]], np.float32)
  t = T.ImageTransform(size=40, random_crop=True, flip=True)
  out = t({"image": img, "boxes": boxes}, np.random.default_rng(seed))
  dark = T.to_uint8(out["image"])[..., 0] < 128
  ys, xs = np.nonzero(dark)
  measured = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 40
  np.testing.assert_allclose(out["boxes"][0], measured, atol=1e-6)
  # Same generator state, same result; the crop/flip do vary across seeds.
  again = t({"image": img, "boxes": boxes}, np.random.default_rng(seed))
  np.testing.assert_array_equal(again["image"], out["image"])


def test_random_crop_varies_and_needs_rng():
  img = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
  t = T.ImageTransform(size=32, random_crop=True, flip=True)
  outs = {t({"image": img}, np.random.default_rng(s))["image"].tobytes() for s in range(8)}
  assert len(outs) > 3
  with pytest.raises(ValueError, match="needs an rng"):
    t({"image": img})


def test_super_resolution_pairs():
  rng = np.random.default_rng(0)
  const = np.full((64, 64, 3), 77, np.uint8)
  np.testing.assert_array_equal(T.bicubic_down(const, 4), np.full((16, 16, 3), 77, np.uint8))
  # Bicubic (antialiased) downsampling of a linear ramp stays close to the 4x4 block means.
  ramp = np.repeat(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))[..., None], 3, -1)
  down = T.bicubic_down(ramp, 4).astype(float)
  blocks = ramp.reshape(16, 4, 16, 4, 3).mean((1, 3))
  assert np.abs(down - blocks)[:, 1:-1].max() < 2.0
  img = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
  out = T.SuperResTransform(size=64, factor=4)({"image": img}, np.random.default_rng(1))
  assert out["image"].shape == (64, 64, 3) and out["lr"].shape == (16, 16, 3)
  np.testing.assert_array_equal(T.to_uint8(out["lr"]), T.bicubic_down(T.to_uint8(out["image"])))
  bsr = T.SuperResTransform(size=64, factor=4, degradation="bsr")
  a = bsr({"image": img}, np.random.default_rng(5))["lr"]
  b = bsr({"image": img}, np.random.default_rng(5))["lr"]
  c = bsr({"image": img}, np.random.default_rng(6))["lr"]
  assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
  with pytest.raises(ValueError, match="not divisible by the SR factor 4"):
    T.bicubic_down(np.zeros((10, 12, 3), np.uint8), 4)


@pytest.mark.parametrize("kind", ["box", "stroke"])
def test_inpainting_masks(kind):
  fn = T.box_mask if kind == "box" else T.stroke_mask
  masks = [fn(32, np.random.default_rng(s)) for s in range(10)]
  for m in masks:
    assert m.shape == (32, 32, 1) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert 0.0 < (m == 0).mean() < 0.95  # there is a hole, and something is kept
  assert np.array_equal(masks[0], fn(32, np.random.default_rng(0)))
  assert len({m.tobytes() for m in masks}) == 10
  img = T.to_float(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
  out = T.InpaintTransform(kind)({"image": img}, np.random.default_rng(3))
  keep = out["mask"][..., 0] == 1
  np.testing.assert_array_equal(out["masked_image"][keep], img[keep])  # 1 = keep
  assert (out["masked_image"][~keep] == 0).all()


def test_layout_tokens_closed_form_and_round_trip():
  grid, classes = 16, 18
  boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.4, 0.6, 0.8]], np.float32)
  toks = T.layout_tokens(boxes, [3, 17], grid=grid, num_classes=classes, max_objects=3)
  pad = grid * grid + classes
  q = lambda v: round(v * 15)
  expected = [256 + 3, 0, 255,
              256 + 17, q(0.4) * 16 + q(0.2), q(0.8) * 16 + q(0.6),
              pad, pad, pad]
  assert toks.tolist() == expected and toks.dtype == np.int32
  assert T.layout_vocab_size(grid, classes) == pad + 1
  dec_boxes, dec_labels = T.decode_layout_tokens(toks, grid=grid, num_classes=classes)
  assert dec_labels.tolist() == [3, 17]
  np.testing.assert_allclose(dec_boxes, boxes, atol=0.5 / 15 + 1e-6)
  shuffled = [T.layout_tokens(boxes, [3, 17], grid=grid, num_classes=classes, max_objects=3,
                              rng=np.random.default_rng(s)) for s in range(8)]
  assert {tuple(s[:3]) for s in shuffled} == {tuple(expected[:3]), tuple(expected[3:6])}
  assert np.array_equal(shuffled[0], T.layout_tokens(boxes, [3, 17], grid=grid,
                                                     num_classes=classes, max_objects=3,
                                                     rng=np.random.default_rng(0)))
  with pytest.raises(ValueError, match=r"box labels \[3, 18\] outside \[0, 18\)"):
    T.layout_tokens(boxes, [3, 18], num_classes=classes)
  rec = T.LayoutTransform(grid=grid, num_classes=classes, max_objects=1)(
      {"boxes": boxes, "box_labels": np.array([3, 17])})
  assert rec["layout"].tolist() == expected[:3]
