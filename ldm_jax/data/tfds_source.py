"""TFDS datasets as a random-access source, read from ArrayRecord files without TensorFlow.

`tfds.data_source` opens a prepared dataset stored with `file_format='array_record'` and decodes
records with numpy / PIL, so TensorFlow is never imported. The dataset must already be prepared in
`data_dir` (nothing is downloaded at run time: we pass download=False); prepare it once with
`tfds build --file_format=array_record` or a builder's
`download_and_prepare(file_format='array_record')`.

Records: image uint8 [H, W, 3] (grayscale is repeated to 3 channels), plus label int and caption str
when `label_key` / `caption_key` are given.
"""

from typing import Any

import numpy as np


class TfdsSource:
  """Random-access view of a TFDS split stored as ArrayRecord."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
               label_key: str | None = None, caption_key: str | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
    self._source = None
    self._length = len(self._open())

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
    return record

  def __repr__(self) -> str:
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_key={self.image_key!r}, label_key={self.label_key!r}, "
            f"caption_key={self.caption_key!r})")
