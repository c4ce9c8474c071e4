"""Per-example transforms (numpy / PIL): crops, flips, [-1, 1] floats, SR pairs, masks, layouts.

All randomness comes from an explicit `np.random.Generator`, so every transform is deterministic
given a seed; in the loader, Grain hands each record its own generator derived from the loader seed
and the record's position, which makes augmentations reproducible across restarts.

Conventions:
- images are uint8 [H, W, 3] on input and float32 [H, W, 3] in [-1, 1] on output (NHWC once
  batched);
- boxes are (x0, y0, x1, y1) fractions of the image and follow crops and flips; a `box_mask`
  (True = a real box) loses the boxes a crop leaves empty;
- segmentation maps, int [H, W] class indices of the image's size, follow resizes (nearest
  neighbour, so classes never blend), crops and flips pixel for pixel;
- inpainting masks are float32 [H, W, 1] with **1 = keep (known pixel), 0 = hole to fill**. The
  CompVis inpainting code uses the opposite (mask = 1 marks the hole); convert with `1 - mask`.
"""

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


# ---------------------------------------------------------------- geometry ------------------------
def resize_shorter(image: np.ndarray, size: int, resample=Image.BICUBIC) -> np.ndarray:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio: uint8 [H', W', 3]."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))


def crop_offsets(h: int, w: int, size: int, rng: np.random.Generator | None) -> tuple[int, int]:
  """Top-left corner of a size x size crop: centred when rng is None, uniform otherwise."""
  if h < size or w < size:
    raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}; resize first")
  if rng is None:
    return (h - size) // 2, (w - size) // 2
  return int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))


def crop_boxes(boxes: np.ndarray, h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
  """Maps (x0, y0, x1, y1) fractions of an h x w image into a size x size crop, clipped: [N, 4]."""
  scale = np.array([w, h, w, h], np.float32)
  shift = np.array([left, top, left, top], np.float32)
  return np.clip((boxes * scale - shift) / size, 0.0, 1.0).astype(np.float32)


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
  """Boxes of a horizontally flipped image: [N, 4]."""
  return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8, rounded and clipped."""
  return np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Resize (shorter side) + crop + optional flip + [-1, 1]; the loader's standard transform.

  Called as `transform(record, rng)`; `record['image']` must be uint8 [H, W, 3]. Boxes and a
  segmentation map, if present, follow the resize, crop and flip. `random_crop` and `flip` need the
  rng (the loader always passes one).
  """
  size: int = 64
  random_crop: bool = False
  flip: bool = False

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
    if (self.random_crop or self.flip) and rng is None:
      raise ValueError("ImageTransform with random_crop or flip needs an rng")
    out = dict(record)
    image = np.asarray(record["image"])
    seg = out.get("segmentation")
    if seg is not None and np.shape(seg) != image.shape[:2]:
      raise ValueError(f"segmentation map of shape {np.shape(seg)}; expected the image's "
                       f"{image.shape[:2]}")
    image = resize_shorter(image, self.size)  # [H', W', 3]
    h, w = image.shape[:2]
    if seg is not None:
      seg = resize_labels(np.asarray(seg), h, w)  # [H', W']
    top, left = crop_offsets(h, w, self.size, rng if self.random_crop else None)
    image = image[top:top + self.size, left:left + self.size]  # [size, size, 3]
    if seg is not None:
      seg = seg[top:top + self.size, left:left + self.size]  # [size, size]
    boxes = out.get("boxes")
    if boxes is not None:
      # Boxes are fractions of the original image, hence also of the resized one.
      boxes = crop_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), h, w, top, left, self.size)
      if "box_mask" in out:  # A box the crop cut away entirely is no object of this image.
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
        out["box_mask"] = np.asarray(out["box_mask"], bool) & (area > 0)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
      if boxes is not None:
        boxes = flip_boxes(boxes)
      if seg is not None:
        seg = seg[:, ::-1]
    if boxes is not None:
      out["boxes"] = boxes.astype(np.float32)
    if seg is not None:
      out["segmentation"] = np.ascontiguousarray(seg, np.int32)
    out["image"] = to_float(np.ascontiguousarray(image))  # [size, size, 3]
    return out


def resize_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
  """int [H, W] class indices -> int32 [h, w] by nearest neighbour (PIL's, as the image's resize
  places pixels), so that every pixel keeps a class of the input."""
  if labels.shape == (h, w):
    return labels.astype(np.int32)
  im = Image.fromarray(np.asarray(labels, np.int32))  # mode I: any class count
  return np.asarray(im.resize((w, h), resample=Image.NEAREST), np.int32)


# ---------------------------------------------------------------- super-resolution ----------------
# How the low-resolution view of a super-resolution pair is made (config.data.degradation).
BICUBIC, BSR = "bicubic", "bsr"
DEGRADATIONS = (BICUBIC, BSR)


def degrade(image: np.ndarray, factor: int, degradation: str,
            rng: np.random.Generator | None) -> np.ndarray:
  """uint8 [H, W, 3] -> its uint8 [H/f, W/f, 3] low-resolution view: 'bicubic' (deterministic) or
  'bsr' (`bsr_degrade`, random: needs rng)."""
  if degradation == BICUBIC:
    return bicubic_down(image, factor)
  if degradation == BSR:
    if rng is None:
      raise ValueError("the 'bsr' degradation is random: it needs an rng")
    return bsr_degrade(image, factor, rng)
  raise ValueError(f"degradation={degradation!r}; expected one of {list(DEGRADATIONS)}")


def bicubic_down(image: np.ndarray, factor: int = 4) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H/f, W/f, 3] with PIL bicubic (antialiased)."""
  h, w = image.shape[:2]
  if h % factor or w % factor:
    raise ValueError(f"image of {h}x{w} is not divisible by the SR factor {factor}")
  return np.asarray(Image.fromarray(image).resize((w // factor, h // factor), Image.BICUBIC))


def bsr_degrade(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
  """A BSR-style degradation (simplified from Zhang et al. 2021): blur, downsample, noise, JPEG.

  Gaussian blur sigma ~ U(0.2, 2.0) x factor / 4, bicubic down by `factor`, Gaussian noise
  sigma ~ U(1, 12) (0-255 scale), JPEG quality ~ U{30..95}. uint8 [H, W, 3] -> uint8 [H/f, W/f, 3].
  """
  x = image.astype(np.float32)
  sigma = rng.uniform(0.2, 2.0) * factor / 4
  x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")  # [H, W, 3]
  x = bicubic_down(np.clip(np.rint(x), 0, 255).astype(np.uint8), factor).astype(np.float32)
  x = x + rng.normal(0.0, rng.uniform(1.0, 12.0), size=x.shape)  # [h, w, 3]
  x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@dataclasses.dataclass(frozen=True)
class SuperResTransform:
  """Adds a low-resolution view: record['lr'] float32 [H/f, W/f, 3] in [-1, 1].

  Expects record['image'] uint8 [H, W, 3] (apply it before `ImageTransform`-style float conversion,
  or use `size` here to crop first); the HR image becomes float32 [-1, 1] too.
  """
  size: int = 256
  factor: int = 4
  degradation: str | None = None  # None or "bicubic": plain bicubic; "bsr": blur + noise + JPEG
  random_crop: bool = True

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
    degradation = self.degradation or BICUBIC
    if degradation not in DEGRADATIONS:
      raise ValueError(f"degradation={self.degradation!r}; expected None or one of "
                       f"{list(DEGRADATIONS)}")
    if rng is None and (self.random_crop or degradation != BICUBIC):
      raise ValueError("SuperResTransform with random_crop or degradation needs an rng")
    image = resize_shorter(np.asarray(record["image"]), self.size)
    top, left = crop_offsets(*image.shape[:2], self.size, rng if self.random_crop else None)
    hr = np.ascontiguousarray(image[top:top + self.size, left:left + self.size])  # [S, S, 3]
    lr = degrade(hr, self.factor, degradation, rng)
    # The annotations of the full image do not describe the crop's low-resolution pair.
    out = {k: v for k, v in record.items()
           if k not in ("boxes", "box_mask", "segmentation")}
    out["image"], out["lr"] = to_float(hr), to_float(lr)
    return out


# ---------------------------------------------------------------- inpainting masks ----------------
def box_mask(size: int, rng: np.random.Generator, num_boxes: tuple[int, int] = (1, 3),
             max_frac: float = 0.5) -> np.ndarray:
  """Random rectangular holes. float32 [size, size, 1], 1 = keep, 0 = hole."""
  mask = np.ones((size, size), np.float32)
  for _ in range(int(rng.integers(num_boxes[0], num_boxes[1] + 1))):
    bh = int(rng.integers(max(1, size // 8), max(2, int(size * max_frac)) + 1))
    bw = int(rng.integers(max(1, size // 8), max(2, int(size * max_frac)) + 1))
    top, left = int(rng.integers(0, size - bh + 1)), int(rng.integers(0, size - bw + 1))
    mask[top:top + bh, left:left + bw] = 0.0
  return mask[..., None]


def stroke_mask(size: int, rng: np.random.Generator, num_strokes: tuple[int, int] = (1, 4),
                max_vertices: int = 8,
                width_frac: tuple[float, float] = (0.04, 0.12)) -> np.ndarray:
  """Free-form brush strokes (random polylines with round joints), as in DeepFill v2 / LaMa.

  float32 [size, size, 1], 1 = keep, 0 = hole.
  """
  canvas = Image.new("L", (size, size), 255)
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(num_strokes[0], num_strokes[1] + 1))):
    width = max(1, int(rng.uniform(*width_frac) * size))
    x, y = rng.uniform(0, size, size=2)
    points = [(x, y)]
    for _ in range(int(rng.integers(2, max_vertices + 1))):
      angle = rng.uniform(0, 2 * np.pi)
      length = rng.uniform(0.1, 0.3) * size
      x = float(np.clip(x + length * np.cos(angle), 0, size - 1))
      y = float(np.clip(y + length * np.sin(angle), 0, size - 1))
      points.append((x, y))
    draw.line(points, fill=0, width=width)
    for px, py in points:  # round joints so the stroke has no gaps at corners
      draw.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=0)
  return (np.asarray(canvas, np.float32) / 255.0)[..., None]


@dataclasses.dataclass(frozen=True)
class InpaintTransform:
  """Adds record['mask'] float32 [H, W, 1] (1 = keep) and record['masked_image'] = image * mask.

  Expects record['image'] already float32 [H, W, 3] in [-1, 1] (run after `ImageTransform`); the
  hole is filled with 0 (mid-grey), as the LDM inpainting conditioning does.
  """
  kind: str = "mixed"  # "box", "stroke" or "mixed" (box or strokes with probability 1/2 each)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
    if rng is None:
      raise ValueError("InpaintTransform needs an rng")
    if self.kind not in ("box", "stroke", "mixed"):
      raise ValueError(f"kind={self.kind!r}; expected 'box', 'stroke' or 'mixed'")
    image = np.asarray(record["image"], np.float32)
    size = image.shape[0]
    use_box = self.kind == "box" or (self.kind == "mixed" and rng.random() < 0.5)
    mask = box_mask(size, rng) if use_box else stroke_mask(size, rng)  # [H, W, 1]
    out = dict(record)
    out["mask"], out["masked_image"] = mask, image * mask
    return out


# ---------------------------------------------------------------- layout tokens -------------------
def layout_vocab_size(grid: int, num_classes: int) -> int:
  """Coordinate tokens [0, grid^2), class tokens [grid^2, grid^2 + C), then one padding token."""
  return grid * grid + num_classes + 1


def layout_tokens(boxes: np.ndarray, labels: np.ndarray, *, grid: int = 16, num_classes: int,
                  max_objects: int = 8, rng: np.random.Generator | None = None) -> np.ndarray:
  """Encodes boxes as a fixed-length token sequence, int32 [3 * max_objects].

  Each object becomes (class token, top-left corner token, bottom-right corner token) where a corner
  (x, y) in [0, 1] is quantised to q(v) = round(v * (grid - 1)) and coded as q(y) * grid + q(x)
  (the layout coding of taming-transformers / LDM layout-to-image); class c is grid^2 + c. Unused
  slots hold the padding token `layout_vocab_size(grid, num_classes) - 1`. Objects keep their order
  unless `rng` is given (then they are shuffled, deterministically for a given generator state);
  objects beyond `max_objects` are dropped.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = np.asarray(labels, np.int64).reshape(-1)
  if len(boxes) != len(labels):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels; expected equal counts")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"box labels {labels.tolist()} outside [0, {num_classes})")
  order = rng.permutation(len(boxes)) if rng is not None else np.arange(len(boxes))
  order = order[:max_objects]
  pad = layout_vocab_size(grid, num_classes) - 1
  tokens = np.full((max_objects, 3), pad, np.int32)  # [M, 3]
  q = np.rint(np.clip(boxes[order], 0.0, 1.0) * (grid - 1)).astype(np.int32)  # [n, 4]
  tokens[:len(order), 0] = grid * grid + labels[order]
  tokens[:len(order), 1] = q[:, 1] * grid + q[:, 0]
  tokens[:len(order), 2] = q[:, 3] * grid + q[:, 2]
  return tokens.reshape(-1)


@dataclasses.dataclass(frozen=True)
class LayoutCoding:
  """How a layout model codes boxes as tokens (`layout_tokens`): its config's
  `model.cond_stage.layout`, saved with the model so that sampling codes boxes as training did."""
  grid: int
  num_classes: int
  max_objects: int

  def tokens(self, boxes: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None
             ) -> np.ndarray:
    """One image's boxes float32 [N, 4] (fractions), labels [N] and optional validity mask [N]
    -> int32 [3 * max_objects]."""
    boxes, labels = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels).reshape(-1)
    if mask is not None:
      keep = np.asarray(mask, bool).reshape(-1)
      boxes, labels = boxes[keep], labels[keep]
    return layout_tokens(boxes, labels, grid=self.grid, num_classes=self.num_classes,
                         max_objects=self.max_objects)


def layout_coding(cond_stage: Any) -> LayoutCoding:
  """The LayoutCoding of a layout model's cond_stage config (a mapping with `layout` and the token
  transformer's `kwargs`); ValueError naming the field, the value and what was expected."""
  layout = (cond_stage or {}).get("layout")
  if not layout:
    raise ValueError("model.cond_stage.layout is missing: a layout model's config must say how "
                     "boxes become tokens, dict(grid=..., num_classes=..., max_objects=...)")
  values = {}
  for field, low in (("grid", 2), ("num_classes", 1), ("max_objects", 1)):
    v = layout.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"model.cond_stage.layout.{field}={v!r}; expected an integer >= {low}")
    values[field] = v
  coding = LayoutCoding(**values)
  kwargs = (cond_stage or {}).get("kwargs", {}) or {}
  vocab = layout_vocab_size(coding.grid, coding.num_classes)
  if "vocab_size" in kwargs and vocab > kwargs["vocab_size"]:
    raise ValueError(f"model.cond_stage.layout: grid={coding.grid}, num_classes="
                     f"{coding.num_classes} need {vocab} tokens; expected at most the "
                     f"transformer's vocab_size={kwargs['vocab_size']}")
  if "max_length" in kwargs and 3 * coding.max_objects > kwargs["max_length"]:
    raise ValueError(f"model.cond_stage.layout.max_objects={coding.max_objects} makes "
                     f"{3 * coding.max_objects} tokens; expected at most the transformer's "
                     f"max_length={kwargs['max_length']}")
  return coding


def decode_layout_tokens(tokens: np.ndarray, *, grid: int, num_classes: int):
  """Inverse of `layout_tokens` up to quantisation: (boxes float32 [n, 4], labels int32 [n])."""
  tokens = np.asarray(tokens).reshape(-1, 3)
  keep = tokens[:, 0] != layout_vocab_size(grid, num_classes) - 1
  tokens = tokens[keep]
  corner = lambda t: np.stack([t % grid, t // grid], -1) / (grid - 1)  # [n, 2] (x, y)
  boxes = np.concatenate([corner(tokens[:, 1]), corner(tokens[:, 2])], -1).astype(np.float32)
  return boxes, (tokens[:, 0] - grid * grid).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LayoutTransform:
  """Adds record['layout'] = layout_tokens(record['boxes'], record['box_labels']) (int32 [3M])."""
  grid: int = 16
  num_classes: int = 18
  max_objects: int = 8
  shuffle: bool = False

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
    out = dict(record)
    out["layout"] = layout_tokens(record["boxes"], record["box_labels"], grid=self.grid,
                                  num_classes=self.num_classes, max_objects=self.max_objects,
                                  rng=rng if self.shuffle else None)
    return out
