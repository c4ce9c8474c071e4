"""TFDS datasets with boxes and segmentation maps: a tiny dataset written from the shapes renderer
(TFDS's BBoxFeature sequence and an image feature of class indices), read back as layout and
semantic-synthesis records, moved by crops and flips, resumed, reached by the training pipeline
from an experiment config, and every refusal."""

import json
import pickle

import numpy as np
from PIL import Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from folder_util import shapes_map  # pylint: disable=g-import-not-at-top
from ldm_jax import validate
from ldm_jax.data import annotations
from ldm_jax.data import loader
from ldm_jax.data import shapes
from ldm_jax.data import transforms
from ldm_jax.data.tfds_source import TfdsSource
from ldm_jax.errors import ConfigError
from ldm_jax.train import inputs

N, SIZE, PAD = 6, 64, 16  # images of SIZE x (SIZE + PAD): white columns on the right
NAME = "ldm_jax_tiny_boxes_test"


def _records() -> list[dict]:
  """Two-object shapes scenes widened by PAD white columns, with their boxes as fractions of the
  wider image, a map of class + 1 on object pixels, and one zero-width box on the last scene."""
  out = []
  for i in range(N):
    rec = shapes.render_shapes(0, i, size=SIZE, num_objects=2)
    seg = shapes_map(rec)  # [SIZE, SIZE] uint8
    image = np.concatenate([rec["image"], np.full((SIZE, PAD, 3), 255, np.uint8)], axis=1)
    seg = np.concatenate([seg, np.zeros((SIZE, PAD), np.uint8)], axis=1)
    boxes = np.array(rec["boxes"], np.float64) * [SIZE / (SIZE + PAD), 1, SIZE / (SIZE + PAD), 1]
    labels = [int(c) for c in rec["box_labels"]]
    if i == N - 1:  # TFDS allows an empty box; it marks no region.
      boxes = np.concatenate([boxes, [[0.5, 0.2, 0.5, 0.4]]])
      labels.append(3)
    out.append({"image": image, "map": seg, "boxes": boxes.astype(np.float32), "labels": labels,
                "id": i})
  return out


RECORDS = _records()


class LdmJaxTinyBoxesTest(tfds.core.GeneratorBasedBuilder):
  """Shapes scenes with TFDS-style objects (bbox in (ymin, xmin, ymax, xmax), label) and maps."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE + PAD, 3)),
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(num_classes=18),
            "raw_label": np.int64}),
        "annotation": tfds.features.Image(shape=(SIZE, SIZE + PAD, 1)),
        "colour_map": tfds.features.Image(shape=(SIZE, SIZE + PAD, 3)),
        "small_map": tfds.features.Image(shape=(8, 8, 1)),
        "id": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for rec in RECORDS:
      objects = [{"bbox": tfds.features.BBox(ymin=float(b[1]), xmin=float(b[0]), ymax=float(b[3]),
                                             xmax=float(b[2])),
                  "label": c, "raw_label": c + 20 * (c == 3)}  # raw 23 is out of range
                 for b, c in zip(rec["boxes"], rec["labels"])]
      colour = np.stack([rec["map"], rec["map"] * 2, rec["map"]], axis=-1)
      yield rec["id"], {
          "image": Image.fromarray(rec["image"]), "objects": objects,
          "annotation": Image.fromarray(rec["map"], mode="L"),
          "colour_map": Image.fromarray(colour.astype(np.uint8)),
          "small_map": Image.fromarray(np.zeros((8, 8), np.uint8), mode="L"), "id": rec["id"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_boxes")
  LdmJaxTinyBoxesTest(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def _source(data_dir, **kw):
  args = dict(max_boxes=3, boxes_key="objects/bbox", box_labels_key="objects/label", maps=True,
              segmentation_key="annotation", num_classes=19)
  args.update(kw)
  return TfdsSource(NAME, "train", data_dir, **args)


def _by_id(src) -> dict[int, dict]:
  """Record id -> the source's record (TFDS shuffles the order on disk)."""
  out = {}
  for j in range(len(src)):
    rec = src[j]
    hits = [r["id"] for r in RECORDS if np.array_equal(r["image"], rec["image"])]
    assert len(hits) == 1
    out[hits[0]] = rec
  return out


def test_records_hold_xyxy_boxes_padded_and_the_map(data_dir):
  src = _source(data_dir)
  assert len(src) == N
  got = _by_id(src)
  for want in RECORDS:
    rec = got[want["id"]]
    # TFDS's (ymin, xmin, ymax, xmax) became (x0, y0, x1, y1); two real boxes, one padding row.
    np.testing.assert_allclose(rec["boxes"][:2], want["boxes"][:2], atol=1e-6)
    assert rec["box_labels"][:2].tolist() == want["labels"][:2]
    assert rec["box_mask"].tolist() == [True, True, False]
    assert rec["boxes"].dtype == np.float32 and rec["box_labels"].dtype == np.int32
    np.testing.assert_array_equal(rec["segmentation"], want["map"])
    assert rec["segmentation"].dtype == np.int32 and rec["segmentation"].max() > 0
  # The last scene's zero-width box was left out and counted.
  assert src.num_dropped_boxes == 1
  # Picklable for loader workers, the annotation settings kept.
  clone = pickle.loads(pickle.dumps(src))
  assert clone._source is None and repr(clone) == repr(src)
  np.testing.assert_array_equal(clone[2]["segmentation"], src[2]["segmentation"])


def test_crops_and_flips_move_boxes_and_maps_with_the_image(data_dir):
  src = _source(data_dir)
  transform = transforms.ImageTransform(SIZE, random_crop=True, flip=True)  # crops the width
  seen = set()
  for seed in range(8):  # the crop offset and the flip depend on the seed
    for j in range(len(src)):
      rec = src[j]
      out = transform(rec, np.random.default_rng(seed))
      image = transforms.to_uint8(out["image"])  # [SIZE, SIZE, 3]
      # Which crop and flip made this image: exactly one of every offset and flip matches.
      views = [(left, flip) for left in range(PAD + 1) for flip in (False, True)
               if np.array_equal(image, _view(rec["image"], left, flip))]
      assert len(views) == 1
      left, flip = views[0]
      seen.add((j, left, flip))
      # The map took the same crop and flip, pixel for pixel.
      np.testing.assert_array_equal(out["segmentation"], _view(rec["segmentation"], left, flip))
      # And the boxes: x in pixels of the wide image, shifted by the crop, mirrored by the flip.
      x0, y0, x1, y1 = np.asarray(rec["boxes"], np.float64).T  # [3] each, fractions
      x0, x1 = ((np.stack([x0, x1]) * (SIZE + PAD) - left) / SIZE).clip(0, 1)
      if flip:
        x0, x1 = 1 - x1, 1 - x0
      want = np.stack([x0, y0, x1, y1], axis=1)
      real = rec["box_mask"]
      np.testing.assert_allclose(out["boxes"][real], want[real], atol=1e-5)
  # Several offsets and both flips were checked.
  assert len({flip for _, _, flip in seen}) == 2 and len({left for _, left, _ in seen}) > 3


def _view(array, left: int, flip: bool) -> np.ndarray:
  """array[:, left:left + SIZE], mirrored left-right when `flip`."""
  crop = array[:, left:left + SIZE]
  return crop[:, ::-1] if flip else crop


def test_loader_resumes_tfds_boxes_and_maps(data_dir):
  src = _source(data_dir)
  make = lambda: loader.make_loader(src, batch_size=2, seed=3, process_index=0, process_count=1,
                                    read_threads=1, read_buffer_size=4,
                                    transform=transforms.ImageTransform(48, random_crop=True,
                                                                        flip=True))
  it = make()
  next(it)
  state = it.get_state()
  want = next(it)
  assert want["boxes"].shape == (2, 3, 4) and want["segmentation"].shape == (2, 48, 48)
  it2 = make()
  it2.set_state(json.loads(json.dumps(state)))
  got = next(it2)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def _tfds_config(module, data_dir, **data):
  cfg = module.get_config("tiny")
  cfg.data.source = "tfds"
  cfg.data.name = NAME
  cfg.data.data_dir = data_dir
  cfg.data.image_size = SIZE
  cfg.data.batch_size = 2
  cfg.data.random_crop = cfg.data.random_flip = False
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def test_layout_and_semantic_configs_read_tfds_annotations(data_dir):
  from configs import layout2img, semantic_synthesis  # pylint: disable=g-import-not-at-top
  layout = _tfds_config(layout2img, data_dir, boxes_key="objects/bbox",
                        box_labels_key="objects/label")
  semantic = _tfds_config(semantic_synthesis, data_dir, segmentation_key="annotation")
  for cfg in (layout, semantic):
    validate.check_config(cfg, num_devices=1)
  batch = inputs.make_pipeline(layout).next()  # centre crops: the boxes' x shift by PAD / 2
  assert batch["boxes"].shape == (2, 2, 4) and batch["box_mask"].all()
  for image, boxes, labels in zip(batch["image"], batch["boxes"], batch["box_labels"]):
    rec = next(r for r in RECORDS
               if np.allclose(transforms.to_float(r["image"][:, PAD // 2:PAD // 2 + SIZE]), image))
    wide = (SIZE + PAD) / SIZE
    shifted = rec["boxes"][:2] * [wide, 1, wide, 1] - [PAD / 2 / SIZE, 0, PAD / 2 / SIZE, 0]
    np.testing.assert_allclose(boxes, np.clip(shifted, 0, 1), atol=1e-5)
    assert labels.tolist() == rec["labels"][:2]
  batch = inputs.make_pipeline(semantic).next()
  assert batch["segmentation"].shape == (2, SIZE, SIZE) and batch["segmentation"].max() > 0
  # A TFDS source without the feature a model reads is refused before anything runs.
  with pytest.raises(ConfigError, match=r"config.data.boxes_key='': this model reads it from the "
                                        r"TFDS dataset; expected a BBoxFeature sequence"):
    validate.check_config(_tfds_config(layout2img, data_dir), num_devices=1)
  with pytest.raises(ConfigError, match=r"config.data.segmentation_key=''"):
    validate.check_config(_tfds_config(semantic_synthesis, data_dir), num_devices=1)


@pytest.mark.parametrize("kw, message", [
    (dict(boxes_key="objects/box"), r"config.data.boxes_key='objects/box': not a feature of TFDS "
                                    r"ldm_jax_tiny_boxes_test .*no 'box' in \['bbox', 'label', "
                                    r"'raw_label'\]"),
    (dict(boxes_key=""), r"config.data.boxes_key is empty"),
    (dict(num_classes=12, maps=False), r"config.data.box_labels_key='objects/label': TFDS "
                                       r"ldm_jax_tiny_boxes_test has 18 box classes; the model "
                                       r"codes 12"),
    (dict(segmentation_key="maps"), r"config.data.segmentation_key='maps': not a feature"),
])
def test_missing_features_are_refused_when_the_source_opens(data_dir, kw, message):
  with pytest.raises(ValueError, match=message):
    _source(data_dir, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(box_labels_key="objects/raw_label", maps=False),
     r"TFDS ldm_jax_tiny_boxes_test split 'train' record \d: box \d has class 23 in "
     r"'objects/raw_label'; expected an integer in \[0, 19\)"),
    (dict(max_boxes=0, segmentation_key="colour_map"),
     r"record \d: 'colour_map' of shape \(64, 80, 3\); expected class indices \[H, W\]"),
    (dict(max_boxes=0, segmentation_key="small_map"),
     r"record \d: 'small_map' of 8x8 px; expected the image's size 80x64"),
    (dict(max_boxes=0, num_classes=2), r"record \d: 'annotation' holds class \d+; expected class "
                                       r"indices in \[0, 2\)"),
])
def test_bad_values_name_the_dataset_record_and_expectation(data_dir, kw, message):
  src = _source(data_dir, **kw)
  with pytest.raises(annotations.AnnotationError, match=message):
    for j in range(len(src)):
      src[j]
