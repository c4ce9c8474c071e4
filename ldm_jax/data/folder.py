"""Image folders as a random-access source: jpg/png/webp, captions from .txt or metadata.jsonl.

Layout conventions (those of the Hugging Face `imagefolder` loader):
- `caption_source='txt'`: `dir/foo.png` is captioned by `dir/foo.txt` (stripped UTF-8 text);
- `caption_source='jsonl'`: a `metadata.jsonl` in any folder, one JSON object per line with
  `file_name` (relative to that folder) and `text`;
- `labels_from_subfolders=True`: the class of an image is the first folder under `root` on its path;
  class ids follow the sorted folder names.

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

import json
import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
  one, counted in `num_missing_captions`); label int (when labels_from_subfolders).
  """

  def __init__(self, root: str, min_size: int = 0, caption_source: str | None = None,
               labels_from_subfolders: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
               verify: bool = True):
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
    """
    if caption_source not in (None, "txt", "jsonl"):
      raise ValueError(f"caption_source={caption_source!r}; expected None, 'txt' or 'jsonl'")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"ImageFolderSource root={root!r} is not a directory")
    self.root = os.path.abspath(root)
    self.min_size = int(min_size)
    self.caption_source = caption_source
    self.labels_from_subfolders = bool(labels_from_subfolders)
    self.max_pixels = int(max_pixels)
    self.skipped: list[tuple[str, str]] = []
    self.num_filtered_small = 0
    self.num_missing_captions = 0
    self._read_failures: set[str] = set()  # files that failed in __getitem__ (this process)

    candidates = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()  # deterministic order on every host
      for name in sorted(filenames):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          candidates.append(os.path.join(dirpath, name))

    jsonl_captions = self._read_jsonl() if caption_source == "jsonl" else {}
    if self.labels_from_subfolders:
      self.classes = sorted({self._class_dir(p) for p in candidates} - {None})
    else:
      self.classes = []
    class_ids = {c: i for i, c in enumerate(self.classes)}

    self.files, self.captions, self.labels = [], [], []
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
            "data/num_read_failures": self.num_read_failures}

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
    captions = {}
    for dirpath, _, filenames in os.walk(self.root):
      if "metadata.jsonl" not in filenames:
        continue
      meta = os.path.join(dirpath, "metadata.jsonl")
      with open(meta, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
          try:
            line = raw.decode("utf-8")
          except UnicodeDecodeError as e:
            raise ValueError(f"{meta}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1}); expected a UTF-8 JSON Lines file") from None
          if not line.strip():
            continue
          try:
            row = json.loads(line)
            captions[os.path.normpath(os.path.join(dirpath, row["file_name"]))] = str(row["text"])
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}:{lineno}: expected a JSON object with 'file_name' and 'text' "
                             f"fields, got {line.strip()[:200]!r} ({e})") from None
    return captions

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
    return record

  def __repr__(self) -> str:
    # Stable across processes: Grain compares it when restoring an iterator state.
    return (f"ImageFolderSource(root={self.root!r}, n={len(self.files)}, min_size={self.min_size}, "
            f"caption_source={self.caption_source!r}, "
            f"labels_from_subfolders={self.labels_from_subfolders})")
