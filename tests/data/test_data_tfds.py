"""TFDS through ArrayRecord without TensorFlow: build a tiny dataset on the fly and read it back."""

import importlib.util
import pickle
import sys

import numpy as np
from PIL import Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ldm_jax.data import loader  # pylint: disable=g-import-not-at-top
from ldm_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top

N = 12


def _image(i):
  return np.full((8, 10, 3), (i * 20, 255 - i * 20, i), np.uint8)


class LdmJaxTinyTest(tfds.core.GeneratorBasedBuilder):
  """12 solid-colour images with a label and a caption."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 10, 3)),
        "label": tfds.features.ClassLabel(num_classes=4),
        "text": tfds.features.Text(),
        "id": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(N):
      # A PIL image: TFDS encodes it with PIL, whereas numpy arrays would go through tf.image.
      yield i, {"image": Image.fromarray(_image(i)), "label": i % 4, "text": f"colour {i}",
                "id": i}


def test_tfds_array_record_without_tensorflow(tmp_path):
  assert importlib.util.find_spec("tensorflow") is None
  LdmJaxTinyTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = TfdsSource("ldm_jax_tiny_test", "train", data_dir=str(tmp_path), label_key="label",
                   caption_key="text")
  assert len(src) == N
  seen = set()
  for j in range(N):
    rec = src[j]
    i = int(rec["caption"].split()[1])
    seen.add(i)
    assert np.array_equal(rec["image"], _image(i))  # PNG round trip is lossless
    assert rec["label"] == i % 4 and isinstance(rec["caption"], str)
  assert seen == set(range(N))
  # Picklable for loader workers (the ArrayRecord handle is reopened lazily).
  clone = pickle.loads(pickle.dumps(src))
  assert clone._source is None and np.array_equal(clone[3]["image"], src[3]["image"])
  # Through the loader.
  it = loader.make_loader(src, batch_size=4, seed=0, num_epochs=1, process_index=0,
                          process_count=1)
  batches = list(it)
  assert len(batches) == 3 and batches[0]["image"].shape == (4, 8, 10, 3)
  assert batches[0]["image"].dtype == np.float32 and batches[0]["image"].max() <= 1.0
  assert "tensorflow" not in sys.modules
  with pytest.raises(ValueError, match="could not open name='no_such_dataset'"):
    TfdsSource("no_such_dataset", "train", data_dir=str(tmp_path))
  with pytest.raises(KeyError, match="image_key='img'"):
    TfdsSource("ldm_jax_tiny_test", "train", data_dir=str(tmp_path), image_key="img")[0]
