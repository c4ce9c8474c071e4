"""Pixel-level checks of the shapes dataset against its written spec (not against its own code)."""

import re

import numpy as np
import pytest

from ldm_jax.data import shapes

SIZE = 64
SPEC_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
               "yellow": (235, 200, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SPEC_SHAPES = ["circle", "square", "triangle"]
SPEC_ANCHORS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
                "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
CAPTION = re.compile(r"a (\w+) (\w+) at the (top left|top right|bottom left|bottom right|center)")


def _objects(caption):
  return CAPTION.findall(caption)


def _bbox(mask):
  ys, xs = np.nonzero(mask)
  return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # pixel edges


def test_spec_constants():
  assert [n for n, _ in shapes.COLORS] == list(SPEC_COLORS)
  assert [tuple(c) for _, c in shapes.COLORS] == list(SPEC_COLORS.values())
  assert list(shapes.SHAPES) == SPEC_SHAPES
  assert dict(shapes.POSITIONS) == SPEC_ANCHORS
  assert list(shapes.POSITION_NAMES) == list(SPEC_ANCHORS)
  assert shapes.NUM_CLASSES == 18 and shapes.NULL_CLASS == 18


@pytest.mark.parametrize("index", range(40))
def test_single_object_pixels(index):
  ex = shapes.render_shapes(3, index, SIZE)
  img = ex["image"]
  assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
  ((color, shape, position),) = _objects(ex["caption"])
  assert ex["caption"] == f"a {color} {shape} at the {position}"
  rgb = np.array(SPEC_COLORS[color])
  nonwhite = (img != 255).any(-1)
  exact = (img == rgb).all(-1)
  # Every pixel is white, the exact colour, or an edge blend of the two (anti-aliasing).
  ink, ink_ref = 255.0 - img[nonwhite], 255.0 - rgb
  alpha = ink @ ink_ref / (ink_ref @ ink_ref)
  assert np.abs(ink - alpha[:, None] * ink_ref).max() <= 1.5
  x0, y0, x1, y1 = _bbox(nonwhite)
  w, h = x1 - x0, y1 - y0
  # Extent 2r with r in [0.12, 0.18] * size (+- 2 px for the partially covered rim).
  assert 2 * 0.12 * SIZE - 2 <= w <= 2 * 0.18 * SIZE + 2, (w, ex)
  assert abs(w - h) <= 2
  # The reported half-size is in the spec range and matches the pixels.
  r = float(ex["radii"][0])
  assert 0.12 * SIZE <= r <= 0.18 * SIZE
  assert abs(w - 2 * r) <= 2.0 and abs(h - 2 * r) <= 2.0
  # The bounding box centre is within the jitter of the named anchor.
  ax, ay = SPEC_ANCHORS[position]
  assert abs((x0 + x1) / 2 - ax * SIZE) <= 0.04 * SIZE + 1.5
  assert abs((y0 + y1) / 2 - ay * SIZE) <= 0.04 * SIZE + 1.5
  # Background is exactly white away from the object.
  far = np.ones((SIZE, SIZE), bool)
  far[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
  assert (img[far] == 255).all()
  # Area of the shape (exact pixels plus fractional edges) against the closed forms.
  area = exact.sum() + alpha[~exact[nonwhite]].sum()
  expected = {"circle": np.pi * r * r, "square": 4 * r * r, "triangle": 2 * r * r}[shape]
  assert abs(area - expected) / expected < 0.03, (shape, area, expected)
  # Interior pixels have the exact colour: the box for a square, the inner disc for a circle.
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
  cx, cy = ex["centers"][0]
  assert abs(cx - (x0 + x1) / 2) <= 1.0 and abs(cy - (y0 + y1) / 2) <= 1.0
  if shape == "circle":
    inner = (xx - cx) ** 2 + (yy - cy) ** 2 <= (r - 1.5) ** 2
  elif shape == "square":
    inner = (np.abs(xx - cx) <= r - 1.5) & (np.abs(yy - cy) <= r - 1.5)
  else:
    inner = (yy > cy) & (yy < cy + r - 1.5) & (np.abs(xx - cx) <= r / 4)
  assert inner.sum() > 10 and exact[inner].all()
  if shape == "triangle":  # pointing up: a narrow apex row, a full-width base row
    rows = nonwhite[y0:y1].sum(1)
    assert rows[0] <= 4 and rows[-1] >= w - 2 and (np.diff(rows[1:-1]) >= -1).all()
  # Label and box agree with the caption and the pixels.
  ci, si = list(SPEC_COLORS).index(color), SPEC_SHAPES.index(shape)
  assert ex["label"] == ci * 3 + si and ex["box_labels"].tolist() == [ci * 3 + si]
  np.testing.assert_allclose(ex["boxes"][0] * SIZE, [x0, y0, x1, y1], atol=1.5)
  assert ex["boxes"].dtype == np.float32 and ex["box_labels"].dtype == np.int32


@pytest.mark.parametrize("index", range(20))
def test_two_objects_at_distinct_corners(index):
  ex = shapes.render_shapes(5, index, SIZE, num_objects=2)
  objs = _objects(ex["caption"])
  assert len(objs) == 2 and " and " in ex["caption"]
  assert objs[0][2] != objs[1][2] and "center" not in (objs[0][2], objs[1][2])
  img = ex["image"]
  for (color, shape, position), box, lab in zip(objs, ex["boxes"], ex["box_labels"]):
    assert lab == list(SPEC_COLORS).index(color) * 3 + SPEC_SHAPES.index(shape)
    x0, y0, x1, y1 = np.round(box * SIZE).astype(int)
    ax, ay = SPEC_ANCHORS[position]
    assert abs((x0 + x1) / 2 - ax * SIZE) <= 0.04 * SIZE + 1.5
    # The object's colour fills the middle of its box.
    mid = img[(y0 + y1) // 2 + 2, (x0 + x1) // 2]
    assert tuple(mid) == SPEC_COLORS[color]
  # The boxes do not overlap.
  a, b = ex["boxes"]
  assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
  assert ex["label"] == ex["box_labels"][0]


def test_deterministic_per_seed_and_index():
  a, b = shapes.render_shapes(1, 7), shapes.render_shapes(1, 7)
  assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
  others = [shapes.render_shapes(2, 7), shapes.render_shapes(1, 8)]
  assert all(not np.array_equal(a["image"], o["image"]) for o in others)


def test_all_values_occur():
  exs = [shapes.render_shapes(0, i, 16) for i in range(300)]
  objs = [_objects(e["caption"])[0] for e in exs]
  assert {o[0] for o in objs} == set(SPEC_COLORS)
  assert {o[1] for o in objs} == set(SPEC_SHAPES)
  assert {o[2] for o in objs} == set(SPEC_ANCHORS)
  assert {e["label"] for e in exs} == set(range(18))


def test_source():
  src = shapes.ShapesSource(seed=4, size=32, length=11)
  assert len(src) == 11
  rec = src[10]
  assert rec["index"] == 10
  assert np.array_equal(rec["image"], shapes.render_shapes(4, 10, 32)["image"])
  with pytest.raises(IndexError):
    src[11]
  with pytest.raises(ValueError, match="num_objects"):
    shapes.ShapesSource(num_objects=3)
  assert repr(src) == repr(shapes.ShapesSource(seed=4, size=32, length=11))
