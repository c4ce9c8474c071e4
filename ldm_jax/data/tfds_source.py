"""TFDS datasets as a random-access source, read from ArrayRecord files without TensorFlow.

`tfds.data_source` opens a prepared dataset stored with `file_format='array_record'` and decodes
records with numpy / PIL, so TensorFlow is never imported. The dataset must already be prepared in
`data_dir` (nothing is downloaded at run time: we pass download=False); prepare it once with
`tfds build --file_format=array_record` or a builder's
`download_and_prepare(file_format='array_record')`.

Records: image uint8 [H, W, 3] (grayscale is repeated to 3 channels), plus label int and caption str
when `label_key` / `caption_key` are given, and the annotations of layout and semantic-synthesis
models (keys and formats as `annotations` describes them for image folders):
- boxes, when `max_boxes > 0`: `boxes_key` names a TFDS `BBoxFeature` sequence (ymin, xmin, ymax,
  xmax fractions, TFDS's order), `box_labels_key` the class of each box, e.g. 'objects/bbox' and
  'objects/label' for coco, voc or lvis, 'bobjects/bbox' and 'bobjects/label' for open_images_v4.
  A '/' walks into nested features. Boxes become (x0, y0, x1, y1) fractions padded to max_boxes
  with box_mask; a box of zero width or height (which TFDS allows) marks no region and is left
  out, counted in `num_dropped_boxes` with the boxes beyond max_boxes.
- segmentation, when `maps`: `segmentation_key` names an image feature of class indices, e.g.
  'annotation' for scene_parse150 (ADE20K): [H, W], [H, W, 1], or [H, W, 3] with equal channels (a
  colour-coded map is refused), the image's size, every value below num_classes.
Feature keys and a box label feature's class count are checked when the source opens; the values
of a record when it is read, with an AnnotationError naming the dataset, split and record.
"""

from typing import Any

import numpy as np

from ldm_jax.data import annotations


def _walk(tree, path: str):
  """tree['a']['b'] for path 'a/b' (a dict of features or of a decoded record); KeyError naming the
  part that is missing and what was there."""
  node = tree
  for part in path.split("/"):
    node = getattr(node, "feature", node)  # a TFDS Sequence holds its element's features
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      keys = sorted(node) if hasattr(node, "keys") else type(node).__name__
      raise KeyError(f"{path!r}: no {part!r} in {keys}") from None
  return node


class TfdsSource:
  """Random-access view of a TFDS split stored as ArrayRecord."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
               label_key: str | None = None, caption_key: str | None = None,
               max_boxes: int = 0, boxes_key: str | None = None,
               box_labels_key: str | None = None, maps: bool = False,
               segmentation_key: str | None = None, num_classes: int = 0):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
    self.max_boxes, self.boxes_key, self.box_labels_key = int(max_boxes), boxes_key, box_labels_key
    self.maps, self.segmentation_key, self.num_classes = bool(maps), segmentation_key, num_classes
    self.num_dropped_boxes = 0  # in this process: zero-area boxes and boxes beyond max_boxes
    self._source = None
    self._length = len(self._open())
    self._check_annotation_features()

  def _open(self):
    """Opens the ArrayRecord source lazily, so that the object pickles cheaply into workers."""
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                        download=False)
      except Exception as e:  # tfds raises several types for "not prepared" / "wrong format"
        raise ValueError(
            f"TfdsSource could not open name={self.name!r} split={self.split!r} in "
            f"data_dir={self.data_dir!r}: {e}. The dataset must be prepared there with "
            "file_format='array_record'.") from e
    return self._source

  def _check_annotation_features(self) -> None:
    """The boxes / map features exist, and a box label feature has at most num_classes classes:
    checked before training reads a record (and before a run writes anything)."""
    if not (self.max_boxes or self.maps):
      return
    if self.num_classes < 1:
      raise ValueError(f"TfdsSource {self.name}: num_classes={self.num_classes}; expected >= 1 "
                       "when boxes or maps are read")
    wanted = []
    if self.max_boxes:
      wanted += [("data.boxes_key", self.boxes_key, "a BBoxFeature sequence such as objects/bbox"),
                 ("data.box_labels_key", self.box_labels_key, "the boxes' classes such as "
                                                              "objects/label")]
    if self.maps:
      wanted.append(("data.segmentation_key", self.segmentation_key,
                     "an image feature of class indices such as annotation"))
    features = self._open().dataset_info.features
    for field, key, what in wanted:
      if not key:
        raise ValueError(f"config.{field} is empty; this model reads it from TFDS {self.name}: "
                         f"expected {what}")
      try:
        feature = _walk(features, key)
      except KeyError as e:
        raise ValueError(f"config.{field}={key!r}: not a feature of TFDS {self.name} "
                         f"({e.args[0]})") from None
      feature = getattr(feature, "feature", feature)
      classes = getattr(feature, "num_classes", None)
      if field == "data.box_labels_key" and classes is not None and classes > self.num_classes:
        raise ValueError(f"config.{field}={key!r}: TFDS {self.name} has {classes} box classes; "
                         f"the model codes {self.num_classes}")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._open()[int(index)]
    if self.image_key not in ex:
      raise KeyError(f"TfdsSource image_key={self.image_key!r} not in the record keys "
                     f"{sorted(ex)}")
    image = np.asarray(ex[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if image.dtype != np.uint8 or image.shape[-1] != 3:
      raise ValueError(f"TfdsSource {self.name}: image of shape {image.shape} and dtype "
                       f"{image.dtype}; expected uint8 [H, W, 1 or 3]")
    record = {"image": image}
    if self.label_key is not None:
      record["label"] = int(ex[self.label_key])
    if self.caption_key is not None:
      caption = ex[self.caption_key]
      record["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    where = f"TFDS {self.name} split {self.split!r} record {int(index)}"
    if self.max_boxes:
      boxes = self._boxes(_walk(ex, self.boxes_key), _walk(ex, self.box_labels_key), where)
      padded, dropped = annotations.pad_boxes(boxes, self.max_boxes)
      self.num_dropped_boxes += dropped
      record.update(padded)
    if self.maps:
      record[annotations.SEGMENTATION] = self._map(_walk(ex, self.segmentation_key),
                                                   image.shape[:2], where)
    return record

  def _boxes(self, bbox, labels, where: str) -> np.ndarray:
    """TFDS (ymin, xmin, ymax, xmax) fractions [N, 4] and classes [N] -> float32 [n, 5] of
    (x0, y0, x1, y1, class), zero-area boxes left out; AnnotationError naming `where`."""
    yxyx = np.asarray(bbox, np.float64).reshape(-1, 4)  # [N, 4]
    labels = np.asarray(labels).reshape(-1)  # [N]
    if len(labels) != len(yxyx):
      raise annotations.AnnotationError(
          f"{where}: {len(yxyx)} boxes in {self.boxes_key!r} but {len(labels)} classes in "
          f"{self.box_labels_key!r}; expected one class per box")
    ymin, xmin, ymax, xmax = yxyx.T
    bad = ~(np.isfinite(yxyx).all(1) & (0 <= ymin) & (ymin <= ymax) & (ymax <= 1)
            & (0 <= xmin) & (xmin <= xmax) & (xmax <= 1))
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise annotations.AnnotationError(
          f"{where}: box {i} {yxyx[i].tolist()} in {self.boxes_key!r}; expected (ymin, xmin, "
          "ymax, xmax) fractions with 0 <= min <= max <= 1")
    out_of_range = (labels < 0) | (labels >= self.num_classes)
    if out_of_range.any():
      i = int(np.flatnonzero(out_of_range)[0])
      raise annotations.AnnotationError(
          f"{where}: box {i} has class {int(labels[i])} in {self.box_labels_key!r}; expected "
          f"an integer in [0, {self.num_classes})")
    keep = (xmax > xmin) & (ymax > ymin)
    self.num_dropped_boxes += int((~keep).sum())
    return np.stack([xmin, ymin, xmax, ymax, labels], axis=1)[keep].astype(np.float32)

  def _map(self, seg, size: tuple[int, int], where: str) -> np.ndarray:
    """A decoded map feature -> int32 [H, W] class indices; AnnotationError naming `where`."""
    seg = np.asarray(seg)
    if seg.ndim == 3 and (seg.shape[-1] == 1 or (seg == seg[..., :1]).all()):
      seg = seg[..., 0]
    if seg.ndim != 2:
      raise annotations.AnnotationError(
          f"{where}: {self.segmentation_key!r} of shape {seg.shape}; expected class indices "
          "[H, W] or [H, W, 1] (a colour-coded map must be turned into indices first)")
    if seg.shape != tuple(size):
      raise annotations.AnnotationError(
          f"{where}: {self.segmentation_key!r} of {seg.shape[1]}x{seg.shape[0]} px; expected "
          f"the image's size {size[1]}x{size[0]}")
    if seg.size and (seg.min() < 0 or seg.max() >= self.num_classes):
      raise annotations.AnnotationError(
          f"{where}: {self.segmentation_key!r} holds class {int(seg.max())}; expected class "
          f"indices in [0, {self.num_classes}) (map unlabelled pixels such as 255 to a class "
          "first)")
    return seg.astype(np.int32)

  def __repr__(self) -> str:
    # Stable across runs: the loader's saved state names the source.
    extra = ""
    if self.max_boxes:
      extra += (f", max_boxes={self.max_boxes}, boxes_key={self.boxes_key!r}, "
                f"box_labels_key={self.box_labels_key!r}")
    if self.maps:
      extra += f", segmentation_key={self.segmentation_key!r}"
    if self.max_boxes or self.maps:
      extra += f", num_classes={self.num_classes}"
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_key={self.image_key!r}, label_key={self.label_key!r}, "
            f"caption_key={self.caption_key!r}{extra})")
