"""Per-image annotations of image folders: object boxes and segmentation maps.

What the records of an image folder carry beside the image (keys BOXES ... below):
- boxes       float32 [max_boxes, 4]: (x0, y0, x1, y1) as fractions of the image's width / height;
- box_labels  int32 [max_boxes]: the class of each box, in [0, num_classes);
- box_mask    bool [max_boxes]: True for a real box, False for the padding after the last one;
- segmentation int32 [H, W]: the class of every pixel, the image's size.

Boxes are read from one of two files, both in **pixels of the image as loaded** (EXIF orientation
applied, as viewers show it), the convention of COCO and of most annotation tools:
- `metadata.jsonl` lines (in any folder under the root, as for captions):
  `{"file_name": "a.jpg", "boxes": [[x0, y0, x1, y1, class], ...]}` with integer classes in
  [0, num_classes); a line without "boxes" or an image without a line has no boxes;
- a COCO-style instances JSON (`images` with `id`, `file_name`; `annotations` with `image_id`,
  `bbox` [x, y, w, h] and `category_id`; `categories` with `id`), file names relative to the root.
  Category ids are mapped to contiguous class indices in ascending id order (COCO's 80 ids in
  1..90 become 0..79); `category_names` lists the names in that order. Crowd annotations
  (`iscrowd` 1) mark regions of many objects rather than one, and are left out.
A box may reach up to `EDGE_TOLERANCE` px beyond the image (float rounding of exported boxes) and is
clipped to it; one further out, empty or inverted is an error naming the file, the entry and the
image size. An image with more than `max_boxes` boxes keeps its `max_boxes` largest ones, in file
order (a layout model codes a fixed number of objects); `num_dropped` counts the boxes left out.

Segmentation maps live in `<root>/maps/`, one PNG per image at the image's relative path with the
extension .png (`<root>/a/b.jpg` -> `<root>/maps/a/b.png`), holding class indices: a palette (P)
image's indices or a grayscale (L, or 16-bit I) image's values. Every pixel must be a class below
num_classes (datasets that mark unlabelled pixels with 255 must map them to a class first), and the
map must have the image's size.
"""

import json
import math
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image

# Record keys (sources.RECORD_KEYS describes every key a source may yield).
BOXES, BOX_LABELS, BOX_MASK, SEGMENTATION = "boxes", "box_labels", "box_mask", "segmentation"

EDGE_TOLERANCE = 1.0  # pixels a box may overshoot the image before it is an error
MAPS_DIR = "maps"
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


class AnnotationError(ValueError):
  """Boxes or a map that cannot be used; the message names the file, the entry and what was
  expected."""


# ---------------------------------------------------------------- metadata.jsonl ------------------
def metadata_rows(root: str) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
  """(metadata.jsonl path, line number, folder, the line's JSON object) for every non-empty line of
  every metadata.jsonl under `root`, in a deterministic order. A line that is not UTF-8 or not a
  JSON object with a 'file_name' string is an AnnotationError naming the file and line."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    if "metadata.jsonl" not in filenames:
      continue
    meta = os.path.join(dirpath, "metadata.jsonl")
    with open(meta, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise AnnotationError(f"{meta}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); expected a UTF-8 JSON Lines file") from None
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise AnnotationError(f"{meta}:{lineno}: not JSON ({e}); got "
                                f"{line.strip()[:200]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
          raise AnnotationError(f"{meta}:{lineno}: expected a JSON object with a 'file_name' "
                                f"string, got {line.strip()[:200]!r}")
        yield meta, lineno, dirpath, row


def metadata_boxes(root: str) -> dict[str, tuple[list, str]]:
  """Normalised image path -> (its raw 'boxes' list, 'file:line' naming the entry), from the
  metadata.jsonl lines under `root` that have 'boxes'."""
  out = {}
  for meta, lineno, dirpath, row in metadata_rows(root):
    if "boxes" in row:
      out[os.path.normpath(os.path.join(dirpath, row["file_name"]))] = (row["boxes"],
                                                                        f"{meta}:{lineno}")
  return out


# ---------------------------------------------------------------- COCO instances ------------------
def coco_boxes(path: str, root: str) -> tuple[dict[str, tuple[list, str]], list[str]]:
  """Boxes of a COCO-style instances JSON: (normalised image path -> ([[x0, y0, x1, y1, class],
  ...] in pixels, 'file image id N' naming the entry), category names in class order)."""
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise AnnotationError(f"boxes file {path}: no such file; expected a COCO instances JSON")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise AnnotationError(f"boxes file {path}: not JSON ({e})") from None
  if not isinstance(data, dict) or not all(
      isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
    raise AnnotationError(f"boxes file {path}: expected a COCO instances object with 'images', "
                          "'annotations' and 'categories' lists")
  try:
    categories = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in data["categories"])
    class_of = {cid: i for i, (cid, _) in enumerate(categories)}
    files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
  except (KeyError, TypeError, ValueError) as e:
    raise AnnotationError(f"boxes file {path}: expected categories with an integer 'id' and images "
                          f"with 'id' and 'file_name' ({type(e).__name__}: {e})") from None
  out = {os.path.normpath(os.path.join(root, name)): ([], f"{path} image id {iid}")
         for iid, name in files.items()}
  for n, ann in enumerate(data["annotations"]):
    where = f"{path} annotations[{n}]"
    if not isinstance(ann, dict) or ann.get("image_id") not in files:
      raise AnnotationError(f"{where}: expected an object whose 'image_id' is one of the images' "
                            f"ids, got {json.dumps(ann)[:200]}")
    if ann.get("iscrowd", 0):
      continue
    bbox, cid = ann.get("bbox"), ann.get("category_id")
    if (not isinstance(bbox, list) or len(bbox) != 4
        or not all(_is_finite_number(v) for v in bbox)):
      raise AnnotationError(f"{where}: bbox={bbox!r}; expected [x, y, width, height] in pixels")
    if cid not in class_of:
      raise AnnotationError(f"{where}: category_id={cid!r}; expected one of the categories' ids "
                            f"{sorted(class_of)[:20]}")
    x, y, w, h = (float(v) for v in bbox)
    key = os.path.normpath(os.path.join(root, files[ann["image_id"]]))
    out[key][0].append([x, y, x + w, y + h, class_of[cid]])
  return out, [name for _, name in categories]


# ---------------------------------------------------------------- checking and padding ------------
def _is_finite_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_boxes(raw: Any, where: str, height: int, width: int, num_classes: int) -> np.ndarray:
  """[[x0, y0, x1, y1, class], ...] in pixels of a height x width image -> float32 [N, 5] with
  the coordinates as fractions of the image; AnnotationError naming `where` for a malformed list,
  a box outside the image, empty or inverted, or a class outside [0, num_classes)."""
  if not isinstance(raw, list):
    raise AnnotationError(f"{where}: boxes={json.dumps(raw)[:200]}; expected a list of "
                          "[x0, y0, x1, y1, class]")
  out = np.zeros((len(raw), 5), np.float32)
  for i, box in enumerate(raw):
    if (not isinstance(box, (list, tuple)) or len(box) != 5
        or not all(_is_finite_number(v) for v in box)):
      raise AnnotationError(f"{where}: box {i} is {json.dumps(box)[:100]}; expected "
                            "[x0, y0, x1, y1, class] finite numbers (pixels, integer class)")
    x0, y0, x1, y1, cls = box
    if cls != int(cls) or not 0 <= cls < num_classes:
      raise AnnotationError(f"{where}: box {i} {list(box)} has class {cls}; expected an integer "
                            f"in [0, {num_classes})")
    tol = EDGE_TOLERANCE
    if not (-tol <= x0 < x1 <= width + tol and -tol <= y0 < y1 <= height + tol):
      raise AnnotationError(f"{where}: box {i} {list(box)} is not inside the {width}x{height} "
                            f"image; expected 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                            "(pixels)")
    out[i, :4] = np.clip([x0 / width, y0 / height, x1 / width, y1 / height], 0.0, 1.0)
    out[i, 4] = cls
  return out


def pad_boxes(boxes: np.ndarray, max_boxes: int) -> tuple[dict[str, np.ndarray], int]:
  """float32 [N, 5] (fractions + class) -> ({boxes [M, 4], box_labels [M], box_mask [M]}, how many
  boxes were dropped), keeping the `max_boxes` largest in their original order."""
  keep = np.arange(len(boxes))
  if len(boxes) > max_boxes:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
  n = len(keep)
  out = {BOXES: np.zeros((max_boxes, 4), np.float32),
         BOX_LABELS: np.zeros((max_boxes,), np.int32),
         BOX_MASK: np.zeros((max_boxes,), bool)}
  out[BOXES][:n] = boxes[keep, :4]
  out[BOX_LABELS][:n] = boxes[keep, 4].astype(np.int32)
  out[BOX_MASK][:n] = True
  return out, len(boxes) - n


# ---------------------------------------------------------------- segmentation maps ---------------
def map_path(root: str, image_path: str) -> str:
  """The segmentation map of `image_path` (under `root`): <root>/maps/<relative path>.png."""
  rel = os.path.splitext(os.path.relpath(image_path, root))[0] + ".png"
  return os.path.join(root, MAPS_DIR, rel)


def map_size(path: str, image: str) -> tuple[int, int]:
  """(height, width) of a map from its header; AnnotationError naming the map and its image when
  it is missing or not a single-channel PNG."""
  if not os.path.isfile(path):
    if not image:
      raise AnnotationError(f"{path}: no such segmentation map (a PNG of class indices)")
    raise AnnotationError(f"{path}: no such segmentation map for image {image}; expected a PNG of "
                          f"class indices at {MAPS_DIR}/<the image's path>.png under the root")
  try:
    with Image.open(path, formats=["PNG"]) as im:
      mode, (w, h) = im.mode, im.size
  except (OSError, ValueError, SyntaxError) as e:
    raise AnnotationError(f"{path}: not a readable PNG segmentation map ({e})") from None
  if mode not in _INDEX_MODES:
    raise AnnotationError(f"{path}: a {mode} PNG; expected a single-channel map of class indices "
                          f"(palette P, grayscale L or 16-bit I)")
  return h, w


def read_map(path: str, num_classes: int, size: tuple[int, int] | None = None,
             image: str = "") -> np.ndarray:
  """A map PNG -> int32 [H, W] class indices, checked: single channel, `size` (height, width) when
  given, every value below num_classes. AnnotationError naming the map (and its image)."""
  for_image = f" (of image {image})" if image else ""
  h, w = map_size(path, image)
  if size is not None and (h, w) != tuple(size):
    raise AnnotationError(f"{path}{for_image}: map of {w}x{h} px; expected the image's size "
                          f"{size[1]}x{size[0]}")
  try:
    with Image.open(path, formats=["PNG"]) as im:
      labels = np.asarray(im, np.int64)  # [H, W]: palette indices or gray values
  except (OSError, ValueError, SyntaxError) as e:
    raise AnnotationError(f"{path}: cannot decode the map ({type(e).__name__}: {e})") from None
  top = int(labels.max()) if labels.size else 0
  if top >= num_classes or (labels.size and labels.min() < 0):
    bad = int((labels >= num_classes).sum())
    raise AnnotationError(f"{path}{for_image}: {bad} pixels hold class {top}; expected class "
                          f"indices in [0, {num_classes})")
  return labels.astype(np.int32)


def one_hot(maps: np.ndarray, num_classes: int) -> np.ndarray:
  """int [..., H, W] class indices -> float32 [..., H, W, num_classes]."""
  return np.eye(num_classes, dtype=np.float32)[np.asarray(maps)]
