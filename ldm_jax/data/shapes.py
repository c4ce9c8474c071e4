"""The built-in `shapes` dataset: coloured discs, squares and triangles on white, with captions.

Every example is a pure function of (seed, index), so the dataset needs no files, is identical on
every host and worker, and can be regenerated to check what a model was trained on.

The spec (kept exact so that `shapes_detect` can grade generated samples against their prompts):
- square RGB images, `size` px (default 64), background white (255, 255, 255);
- 6 colours (COLORS, in order) x 3 shapes (SHAPES, in order); class label = color * 3 + shape,
  NUM_CLASSES = 18 and NULL_CLASS = 18 (the "no label" class for classifier-free guidance);
- half-size r ~ U(0.12, 0.18) * size: a disc of radius r, an axis-aligned square of side 2r, or a
  triangle pointing up with base 2r and height 2r, centred (its bounding box) on its anchor;
- anchors (x, y fractions): top left (.25,.25), top right (.75,.25), bottom left (.25,.75),
  bottom right (.75,.75), center (.5,.5), each jittered by U(-0.04, 0.04) per axis;
- one object (any anchor) or two objects at two distinct corners;
- caption "a {color} {shape} at the {position}" per object, joined by " and ";
- boxes (x0, y0, x1, y1) in [0, 1], with box_labels = the class of each object.

Rendering is anti-aliased by 4x4 supersampling of the coverage; pixels fully inside a shape keep
the exact palette colour, only edge pixels are blends with white.
"""

import dataclasses
from typing import Any

import numpy as np

COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (235, 200, 40)),
    ("purple", (150, 60, 200)),
    ("orange", (245, 140, 30)),
)
COLOR_NAMES = tuple(name for name, _ in COLORS)
PALETTE = np.array([rgb for _, rgb in COLORS], np.uint8)  # [6, 3]
SHAPES = ("circle", "square", "triangle")
POSITIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("top left", (0.25, 0.25)),
    ("top right", (0.75, 0.25)),
    ("bottom left", (0.25, 0.75)),
    ("bottom right", (0.75, 0.75)),
    ("center", (0.5, 0.5)),
)
POSITION_NAMES = tuple(name for name, _ in POSITIONS)
CORNERS = (0, 1, 2, 3)  # indices into POSITIONS usable in two-object mode
NUM_CLASSES = len(COLORS) * len(SHAPES)  # 18
NULL_CLASS = NUM_CLASSES  # 18: "no class", used for classifier-free guidance
R_RANGE = (0.12, 0.18)  # half-size as a fraction of the image size
JITTER = 0.04  # max anchor jitter per axis, as a fraction of the image size
BACKGROUND = (255, 255, 255)
_SUPERSAMPLE = 4


def caption_words() -> list[str]:
  """Every word a caption can use: the vocabulary of the built-in word tokenizer."""
  words = {"a", "at", "the", "and"}
  for name in list(COLOR_NAMES) + list(SHAPES) + list(POSITION_NAMES):
    words.update(name.split())
  return sorted(words)


def class_label(color_index: int, shape_index: int) -> int:
  """The class id of a (colour, shape) pair: color * 3 + shape."""
  return int(color_index) * len(SHAPES) + int(shape_index)


def caption_for(color_index: int, shape_index: int, position_index: int) -> str:
  """The caption of one object, e.g. "a red circle at the top left"."""
  return (f"a {COLOR_NAMES[color_index]} {SHAPES[shape_index]} at the "
          f"{POSITION_NAMES[position_index]}")


def _coverage(shape_index: int, cx: float, cy: float, r: float,
              size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
  """Fraction of each pixel covered by the shape, from 4x4 sub-pixel samples.

  Returns the coverage of the pixels around the shape, [h, w], and the (rows, cols) slices of the
  image they occupy; every other pixel has coverage 0.
  """
  s = _SUPERSAMPLE
  # Only the pixels of the shape's bounding box (plus one) can be covered.
  x0, x1 = max(0, int(np.floor(cx - r)) - 1), min(size, int(np.ceil(cx + r)) + 1)
  y0, y1 = max(0, int(np.floor(cy - r)) - 1), min(size, int(np.ceil(cy + r)) + 1)
  # Sub-pixel sample centres in pixel units; pixel (i, j) spans [j, j+1) x [i, i+1).
  x = x0 + (np.arange((x1 - x0) * s, dtype=np.float64) + 0.5)[None, :] / s  # [1, w*s]
  y = y0 + (np.arange((y1 - y0) * s, dtype=np.float64) + 0.5)[:, None] / s  # [h*s, 1]
  if shape_index == 0:  # disc of radius r
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  elif shape_index == 1:  # axis-aligned square of side 2r
    inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
  elif shape_index == 2:  # triangle pointing up: apex (cx, cy-r), base y = cy+r from cx-r to cx+r
    depth = y - (cy - r)  # distance below the apex; the half-width grows as depth / 2
    inside = (depth >= 0) & (depth <= 2 * r) & (np.abs(x - cx) <= depth / 2)
  else:
    raise ValueError(f"shape_index={shape_index}; expected 0 (circle), 1 (square) or 2 (triangle)")
  h, w = y1 - y0, x1 - x0
  inside = np.broadcast_to(inside, (h * s, w * s))
  cov = inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)  # [h, w]
  return cov, (slice(y0, y1), slice(x0, x1))


def render_shapes(seed: int, index: int, size: int = 64, num_objects: int = 1,
                  antialias: bool = True) -> dict[str, Any]:
  """Renders example `index` of the shapes dataset with base seed `seed`.

  Returns a dict with
    image: uint8 [size, size, 3]; caption: str; label: int (class of the first object);
    boxes: float32 [N, 4] (x0, y0, x1, y1) in [0, 1]; box_labels: int32 [N];
    colors, shapes, positions: int32 [N] indices into COLORS / SHAPES / POSITIONS;
    centers: float32 [N, 2] (x, y) in pixels; radii: float32 [N] half-sizes in pixels.
  """
  if num_objects not in (1, 2):
    raise ValueError(f"num_objects={num_objects}; expected 1 or 2")
  if size < 8:
    raise ValueError(f"size={size}; expected at least 8 pixels")
  if seed < 0 or index < 0:
    raise ValueError(f"seed={seed}, index={index}; both must be non-negative")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
  if num_objects == 1:
    positions = [int(rng.integers(len(POSITIONS)))]
  else:
    positions = [int(p) for p in rng.choice(CORNERS, size=2, replace=False)]

  image = np.full((size, size, 3), BACKGROUND, np.uint8)  # [H, W, 3]
  colors, shapes, boxes, centers, radii, captions = [], [], [], [], [], []
  for pos in positions:
    color = int(rng.integers(len(COLORS)))
    shape = int(rng.integers(len(SHAPES)))
    r = rng.uniform(*R_RANGE) * size
    fx, fy = POSITIONS[pos][1]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    cx, cy = (fx + jx) * size, (fy + jy) * size
    cov, region = _coverage(shape, cx, cy, r, size)  # [h, w]
    if not antialias:
      cov = (cov >= 0.5).astype(np.float32)
    cov = cov[..., None]  # [h, w, 1]
    # Objects never overlap (distinct anchors are further apart than two half-sizes plus jitter),
    # so blending each one with what is under it is exact.
    patch = image[region].astype(np.float32) * (1.0 - cov) + PALETTE[color] * cov  # [h, w, 3]
    image[region] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    colors.append(color)
    shapes.append(shape)
    centers.append((cx, cy))
    radii.append(r)
    boxes.append(np.clip([(cx - r) / size, (cy - r) / size, (cx + r) / size, (cy + r) / size],
                         0.0, 1.0))
    captions.append(caption_for(color, shape, pos))

  box_labels = np.array([class_label(c, s) for c, s in zip(colors, shapes)], np.int32)
  return {
      "image": image,
      "caption": " and ".join(captions),
      "label": int(box_labels[0]),
      "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),  # [N, 4]
      "box_labels": box_labels,  # [N]
      "colors": np.array(colors, np.int32),
      "shapes": np.array(shapes, np.int32),
      "positions": np.array(positions, np.int32),
      "centers": np.array(centers, np.float32).reshape(-1, 2),  # [N, 2]
      "radii": np.array(radii, np.float32),
  }


@dataclasses.dataclass(frozen=True)
class ShapesSource:
  """Random-access source over the shapes dataset with a configurable virtual length.

  Records are the dicts of `render_shapes` without the per-object detail fields, so they batch
  cleanly: index int, image uint8 [H, W, 3], caption str, label int, boxes float32 [N, 4],
  box_labels int32 [N].
  """
  seed: int = 0
  size: int = 64
  num_objects: int = 1
  length: int = 10_000
  antialias: bool = True

  def __post_init__(self):
    if self.length <= 0:
      raise ValueError(f"ShapesSource length={self.length}; expected a positive virtual length")
    if self.num_objects not in (1, 2):
      raise ValueError(f"ShapesSource num_objects={self.num_objects}; expected 1 or 2")

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"index {index} out of range for ShapesSource of length {self.length}")
    ex = render_shapes(self.seed, index, self.size, self.num_objects, self.antialias)
    keep = ("image", "caption", "label", "boxes", "box_labels")
    return {"index": index, **{k: ex[k] for k in keep}}
