"""Image folders as a random-access source: jpg/png/webp, captions from .txt or metadata.jsonl,
object boxes and segmentation maps (`annotations`).

Layout conventions (those of the Hugging Face `imagefolder` loader):
- `caption_source='txt'`: `dir/foo.png` is captioned by `dir/foo.txt` (stripped UTF-8 text);
- `caption_source='jsonl'`: a `metadata.jsonl` in any folder, one JSON object per line with
  `file_name` (relative to that folder) and `text` (a line without it leaves its image
  uncaptioned);
- `labels_from_subfolders=True`: the class of an image is the first folder under `root` on its path;
  class ids follow the sorted folder names;
- `max_boxes > 0`: boxes from metadata.jsonl lines' "boxes" or from a COCO instances JSON
  (`boxes_file`), padded to max_boxes with a mask; `maps=True`: a segmentation map per image in
  `root/maps/`. That folder is reserved for maps: it is never scanned for images. Both formats, their pixel coordinates and
  class indices are described in `annotations`; annotations that do not fit their image are an
  error naming the file and entry, raised when the source is built (a map's pixel classes are
  checked then when `verify`, else when the map is read).

Every file is checked once, when the source is built: unreadable, empty, truncated and
decompression-bomb-sized files (more than `max_pixels` pixels) are skipped with one warning each,
and images whose shorter side is below `min_size` are filtered out. `skipped` lists (path, reason)
and `num_skipped` counts them, for the training metrics (`stats()`). Grayscale, palette, CMYK and
16-bit images are converted to RGB; images with an alpha channel are composited onto white, so
transparent regions read as background instead of whatever colour the encoder left under them.

Reading is strict about what a file is: the extension decides the one decoder PIL may use
(`FORMATS`), so a file named .png that holds some other format (TIFF, PSD, EPS ...) is refused
rather than handed to a decoder nobody meant to expose; and EXIF orientation is applied, so photos
come out upright as viewers show them. A `.txt` caption that is not UTF-8 skips its image like an
unreadable file (one warning naming the caption file, counted in `skipped`): guessing an encoding
would train on garbled text, and one stray file should not stop a scan of millions. A
`metadata.jsonl` that is not UTF-8 is an error naming the file and line, as a malformed line is,
since it holds many captions.
"""

import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_jax.data import annotations

# The decoder PIL may use for each file extension (PIL names).
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
IMAGE_EXTENSIONS = tuple(FORMATS)
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; anything larger is treated as a decompression bomb
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
  """An image file that cannot or must not be decoded; the message names the file and why."""


class CaptionError(ValueError):
  """A caption file that cannot be read as text; the message names the file."""


def open_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: dict[str, str] | None = None) -> Image.Image:
  """Opens `path` with the decoder its extension names, checks its size, decodes it fully and
  applies its EXIF orientation. Raises ImageReadError (or FileNotFoundError) naming the file.

  formats: extension -> PIL format name (default `FORMATS`).
  """
  formats = FORMATS if formats is None else formats
  ext = os.path.splitext(path)[1].lower()
  if ext not in formats:
    raise ImageReadError(f"{path}: extension {ext!r} is not an accepted image type; expected "
                         f"one of {', '.join(sorted(formats))}")
  try:
    with warnings.catch_warnings():
      # PIL warns (then errors) on big images using a global limit; ours is explicit below.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path, formats=[formats[ext]]) as im:
        w, h = im.size
        if w * h > max_pixels:
          raise ImageReadError(f"{path}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
        im.load()  # Full decode: raises OSError on truncated data.
        return ImageOps.exif_transpose(im)
  except Image.DecompressionBombError as e:  # Beyond PIL's own hard limit, raised by open().
    raise ImageReadError(f"{path}: more than max_pixels={max_pixels} pixels ({e})") from None
  except (FileNotFoundError, ImageReadError):
    raise
  except UnidentifiedImageError:
    raise ImageReadError(f"{path}: not a readable {formats[ext]} file (the decoder its extension "
                         f"{ext!r} names)") from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise ImageReadError(f"{path}: cannot decode it ({type(e).__name__}: {e})") from None


def image_size(path: str, formats: dict[str, str] | None = None) -> tuple[int, int]:
  """(height, width) as displayed (EXIF orientation applied), from the header only."""
  formats = FORMATS if formats is None else formats
  ext = os.path.splitext(path)[1].lower()
  if ext not in formats:
    raise ImageReadError(f"{path}: extension {ext!r} is not an accepted image type")
  with Image.open(path, formats=[formats[ext]]) as im:
    w, h = im.size
    if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
      w, h = h, w
  return h, w


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image file fully into uint8 [H, W, 3]; raises on corrupt, truncated, huge files."""
  return to_rgb(open_image(path, max_pixels))


def to_rgb(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]; alpha is composited onto white."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit grayscale: PIL's convert("RGB") would clip at 255; rescale the 16-bit range.
    arr = np.asarray(im, np.float64)
    arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
    return np.repeat(arr[..., None], 3, axis=-1)
  if im.mode == "P" or im.mode == "PA":
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "RGBa", "La"):
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  return np.asarray(im.convert("RGB"), np.uint8)


class ImageFolderSource:
  """Random-access source over the images under `root`.

  Records: image uint8 [H, W, 3]; caption str (when caption_source is set; '' for images without
  one, counted in `num_missing_captions`); label int (when labels_from_subfolders); boxes float32
  [max_boxes, 4], box_labels int32 [max_boxes] and box_mask bool [max_boxes] (when max_boxes);
  segmentation int32 [H, W] (when maps).
  """

  def __init__(self, root: str, min_size: int = 0, caption_source: str | None = None,
               labels_from_subfolders: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
               verify: bool = True, max_boxes: int = 0, boxes_file: str | None = None,
               maps: bool = False, num_classes: int = 0):
    """Scans `root`.

    Args:
      root: folder to search recursively.
      min_size: images whose shorter side is smaller are filtered out.
      caption_source: None, 'txt' or 'jsonl' (see the module docstring).
      labels_from_subfolders: class labels from the first sub-folder name.
      max_pixels: larger images are skipped (decompression-bomb guard).
      verify: decode every image once while scanning, so that truncated files are found up front.
        With False only headers are read; a file that fails later is replaced by the next
        readable one in __getitem__ (with one warning, counted in `num_read_failures`).
      max_boxes: boxes per record, padded (0: no boxes).
      boxes_file: a COCO instances JSON with the boxes (None: metadata.jsonl "boxes").
      maps: read a segmentation map per image from root/maps/.
      num_classes: classes of the boxes and map pixels (needed with max_boxes or maps).
    """
    if caption_source not in (None, "txt", "jsonl"):
      raise ValueError(f"caption_source={caption_source!r}; expected None, 'txt' or 'jsonl'")
    if max_boxes < 0 or ((max_boxes or maps) and num_classes < 1):
      raise ValueError(f"max_boxes={max_boxes}, maps={maps}, num_classes={num_classes}; expected "
                       "max_boxes >= 0 and num_classes >= 1 when boxes or maps are read")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"ImageFolderSource root={root!r} is not a directory")
    self.root = os.path.abspath(root)
    self.min_size = int(min_size)
    self.caption_source = caption_source
    self.labels_from_subfolders = bool(labels_from_subfolders)
    self.max_pixels = int(max_pixels)
    self.max_boxes, self.maps, self.num_classes = int(max_boxes), bool(maps), int(num_classes)
    self.boxes_file = os.path.abspath(boxes_file) if boxes_file else None
    self.num_dropped_boxes = 0  # boxes beyond max_boxes (the smallest of their image)
    self.category_names: list[str] = []  # COCO: the class names in class-index order
    self.skipped: list[tuple[str, str]] = []
    self.num_filtered_small = 0
    self.num_missing_captions = 0
    self._read_failures: set[str] = set()  # files that failed in __getitem__ (this process)

    candidates = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()  # deterministic order on every host
      if dirpath == self.root and annotations.MAPS_DIR in dirnames:
        # Segmentation maps are annotations, never training images, whichever model reads the
        # folder (a layout model's folder may hold maps too).
        dirnames.remove(annotations.MAPS_DIR)
        log.info("ImageFolderSource: not scanning %s/%s for images (segmentation maps)",
                 self.root, annotations.MAPS_DIR)
      for name in sorted(filenames):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          candidates.append(os.path.join(dirpath, name))

    jsonl_captions = self._read_jsonl() if caption_source == "jsonl" else {}
    raw_boxes = {}
    if self.max_boxes and self.boxes_file:
      raw_boxes, self.category_names = annotations.coco_boxes(self.boxes_file, self.root)
      if not {os.path.normpath(p) for p in candidates} & set(raw_boxes):
        raise annotations.AnnotationError(
            f"boxes file {self.boxes_file}: none of its {len(raw_boxes)} images' file_name is one "
            f"of the {len(candidates)} images under {self.root}; expected file names relative to "
            "the root")
    elif self.max_boxes:
      raw_boxes = annotations.metadata_boxes(self.root)
    if self.labels_from_subfolders:
      self.classes = sorted({self._class_dir(p) for p in candidates} - {None})
    else:
      self.classes = []
    class_ids = {c: i for i, c in enumerate(self.classes)}

    self.files, self.captions, self.labels, self.boxes = [], [], [], []
    for path in candidates:
      reason, hw = self._check(path, verify)
      if reason is not None:
        self.skipped.append((path, reason))
        log.warning("ImageFolderSource: skipping %s: %s", path, reason)
        continue
      if min(hw) < self.min_size:
        self.num_filtered_small += 1
        continue
      label = None
      if self.labels_from_subfolders:
        cls = self._class_dir(path)
        if cls is None:
          self.skipped.append((path, "not inside a class sub-folder"))
          log.warning("ImageFolderSource: skipping %s: not inside a class sub-folder of %s",
                      path, self.root)
          continue
        label = class_ids[cls]
      if caption_source is not None:
        try:
          caption = (self._read_txt(path) if caption_source == "txt"
                     else jsonl_captions.get(os.path.normpath(path)))
        except CaptionError as e:
          self.skipped.append((path, str(e)))
          log.warning("ImageFolderSource: skipping %s: %s", path, e)
          continue
        if caption is None:
          self.num_missing_captions += 1
          caption = ""
        self.captions.append(caption)
      if self.max_boxes:
        raw, where = raw_boxes.get(os.path.normpath(path), ([], path))
        padded, dropped = annotations.pad_boxes(
            annotations.check_boxes(raw, where, hw[0], hw[1], self.num_classes), self.max_boxes)
        self.num_dropped_boxes += dropped
        self.boxes.append(padded)
      if self.maps:
        self._check_map(path, hw, verify)
      if label is not None:
        self.labels.append(label)
      self.files.append(path)

    if not self.files:
      raise ValueError(
          f"ImageFolderSource found no usable image under {self.root!r}: {len(candidates)} files "
          f"with extensions {IMAGE_EXTENSIONS}, {len(self.skipped)} unreadable, "
          f"{self.num_filtered_small} smaller than min_size={self.min_size}"
          + (f"; first skipped: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped
             else ""))
    if self.num_dropped_boxes:
      log.warning("ImageFolderSource: %d boxes beyond max_boxes=%d left out (the smallest of their "
                  "images)", self.num_dropped_boxes, self.max_boxes)
    if self.num_missing_captions:
      log.warning("ImageFolderSource: %d of %d images under %s have no caption (using '')",
                  self.num_missing_captions, len(self.files), self.root)

  @property
  def num_skipped(self) -> int:
    """Files skipped as unreadable (corrupt, truncated, empty, too many pixels, misplaced, or a
    caption that is not UTF-8)."""
    return len(self.skipped)

  @property
  def num_read_failures(self) -> int:
    """Files that failed when read by this process (workers keep their own count)."""
    return len(self._read_failures)

  def stats(self) -> dict[str, int]:
    """Counters for the training metrics."""
    return {"data/num_images": len(self.files), "data/num_skipped": self.num_skipped,
            "data/num_filtered_small": self.num_filtered_small,
            "data/num_missing_captions": self.num_missing_captions,
            "data/num_read_failures": self.num_read_failures,
            "data/num_dropped_boxes": self.num_dropped_boxes}

  def _class_dir(self, path: str) -> str | None:
    rel = os.path.relpath(path, self.root).split(os.sep)
    return rel[0] if len(rel) > 1 else None

  def _check(self, path: str, verify: bool) -> tuple[str | None, tuple[int, int]]:
    """(None, (h, w)) if the file is readable, else (why not, (0, 0))."""
    try:
      if os.path.getsize(path) == 0:
        return "empty file", (0, 0)
      if verify:
        image = load_rgb(path, self.max_pixels)
        h, w = image.shape[:2]
      else:
        h, w = image_size(path)
        if w * h > self.max_pixels:
          return f"{w}x{h} pixels exceeds max_pixels={self.max_pixels}", (0, 0)
    except ImageReadError as e:  # Its message already names the file; keep only the reason.
      return str(e).removeprefix(f"{path}: "), (0, 0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      return f"{type(e).__name__}: {e}", (0, 0)
    return None, (h, w)

  def _check_map(self, path: str, hw: tuple[int, int], verify: bool) -> None:
    """The map of image `path` exists and has its size (and, when verify, its classes are below
    num_classes); AnnotationError naming the map and the image otherwise."""
    mp = annotations.map_path(self.root, path)
    if verify:
      annotations.read_map(mp, self.num_classes, hw, image=path)
      return
    h, w = annotations.map_size(mp, path)
    if (h, w) != tuple(hw):
      raise annotations.AnnotationError(f"{mp} (of image {path}): map of {w}x{h} px; expected the "
                                        f"image's size {hw[1]}x{hw[0]}")

  @staticmethod
  def _read_txt(path: str) -> str | None:
    txt = os.path.splitext(path)[0] + ".txt"
    if not os.path.exists(txt):
      return None
    with open(txt, "rb") as f:
      data = f.read()
    try:
      return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
      raise CaptionError(f"caption file {txt} is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); re-save it as UTF-8") from None

  def _read_jsonl(self) -> dict[str, str]:
    """Normalised absolute image path -> caption, from every metadata.jsonl under root."""
    # A line without "text" (one that only holds boxes) leaves its image uncaptioned.
    return {os.path.normpath(os.path.join(dirpath, row["file_name"])): str(row["text"])
            for _, _, dirpath, row in annotations.metadata_rows(self.root) if "text" in row}

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.files):
      raise IndexError(f"index {index} out of range for {len(self.files)} images")
    # A file can still fail here (verify=False, or changed on disk since the scan). Training should
    # not die for one bad file: warn once, count it, and use the next readable file instead, which
    # keeps the record a deterministic function of the index.
    for offset in range(len(self.files)):
      i = (index + offset) % len(self.files)
      try:
        image = load_rgb(self.files[i], self.max_pixels)
        break
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if self.files[i] not in self._read_failures:
          self._read_failures.add(self.files[i])
          log.warning("ImageFolderSource: cannot read %s (%s: %s); using the next image",
                      self.files[i], type(e).__name__, e)
    else:
      raise ValueError(f"ImageFolderSource: no image under {self.root!r} can be read any more")
    index = i
    record = {"image": image}
    if self.caption_source is not None:
      record["caption"] = self.captions[index]
    if self.labels_from_subfolders:
      record["label"] = self.labels[index]
    if self.max_boxes:
      record.update({k: v.copy() for k, v in self.boxes[index].items()})
    if self.maps:
      record[annotations.SEGMENTATION] = annotations.read_map(
          annotations.map_path(self.root, self.files[index]), self.num_classes, image.shape[:2],
          image=self.files[index])
    return record

  def __repr__(self) -> str:
    # Stable across processes: Grain compares it when restoring an iterator state.
    return (f"ImageFolderSource(root={self.root!r}, n={len(self.files)}, min_size={self.min_size}, "
            f"caption_source={self.caption_source!r}, "
            f"labels_from_subfolders={self.labels_from_subfolders}{self._annotations_repr()})")

  def _annotations_repr(self) -> str:
    # Only when used, so that the saved loader states of folders without annotations still fit.
    if not (self.max_boxes or self.maps):
      return ""
    return (f", max_boxes={self.max_boxes}, boxes_file={self.boxes_file!r}, maps={self.maps}, "
            f"num_classes={self.num_classes}")
