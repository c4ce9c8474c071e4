"""Image folders with boxes (metadata.jsonl, COCO JSON) and segmentation maps: what the records hold,
that crops and flips move them with the image, that the loader resumes them, and every refusal."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from folder_util import coco_json, write_shapes_folder
from ldm_jax.data import annotations
from ldm_jax.data import loader
from ldm_jax.data import transforms
from ldm_jax.data.folder import ImageFolderSource

SIZE = 32


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes_folder")
  return str(root), write_shapes_folder(root, n=6, size=SIZE)


def _source(root, **kw):
  args = dict(max_boxes=3, maps=True, num_classes=19)
  args.update(kw)
  return ImageFolderSource(root, **args)


def test_records_hold_padded_boxes_and_maps(shapes_folder):
  root, records = shapes_folder
  src = _source(root)
  assert len(src) == 6  # maps/ holds annotations, not training images
  for i, want in enumerate(records):
    rec = src[i]
    np.testing.assert_array_equal(rec["image"], want["image"])
    np.testing.assert_allclose(rec["boxes"][:2], np.asarray(want["pixel_boxes"])[:, :4] / SIZE,
                               atol=1e-6)
    assert rec["box_labels"][:2].tolist() == want["box_labels"].tolist()
    assert rec["box_mask"].tolist() == [True, True, False]  # 2 objects, padded to max_boxes 3
    assert rec["boxes"].shape == (3, 4) and rec["boxes"].dtype == np.float32
    np.testing.assert_array_equal(rec["segmentation"], want["map"])
    assert rec["segmentation"].dtype == np.int32 and set(np.unique(want["map"])) > {0}


def test_coco_json_gives_the_same_boxes_with_contiguous_classes(shapes_folder, tmp_path):
  root, records = shapes_folder
  path = tmp_path / "instances.json"
  coco_json(path, records)  # category ids 3, 7, ..., 71 listed in reverse order
  src = _source(root, boxes_file=str(path), maps=False, num_classes=18)
  meta = _source(root, maps=False, num_classes=18)
  for i in range(len(src)):
    for key in ("boxes", "box_labels", "box_mask"):
      np.testing.assert_array_equal(src[i][key], meta[i][key])
  assert src.category_names == [f"class{c}" for c in range(18)]  # ascending category id


def test_more_boxes_than_max_keeps_the_largest_in_file_order():
  raw = [[0, 0, 2, 2, 0], [0, 0, 10, 10, 1], [5, 5, 6, 6, 2], [0, 0, 8, 4, 3]]
  boxes = annotations.check_boxes(raw, "x", 10, 10, 4)
  padded, dropped = annotations.pad_boxes(boxes, 2)
  assert dropped == 2 and padded["box_labels"].tolist() == [1, 3]
  assert padded["box_mask"].all()


def test_crop_and_flip_move_boxes_and_maps_with_the_image():
  rng = np.random.default_rng(0)
  h, w = 48, 40  # shorter side 40 -> no resize at size 40, a random crop along the height
  image = np.full((h, w, 3), 255, np.uint8)
  seg = np.zeros((h, w), np.int32)
  x0, y0, x1, y1 = 6, 12, 20, 30
  image[y0:y1, x0:x1] = (200, 30, 30)  # a filled rectangle = the box's object
  seg[y0:y1, x0:x1] = 5
  seg[40:, 30:] = 2  # a second region with no box
  record = {"image": image, "segmentation": seg, "boxes": np.array([[x0 / w, y0 / h, x1 / w, y1 / h]]),
            "box_labels": np.array([5]), "box_mask": np.array([True])}
  t = transforms.ImageTransform(40, random_crop=True, flip=True)
  flips = set()
  for seed in range(8):
    out = t(record, np.random.default_rng(seed))
    red = transforms.to_uint8(out["image"])[..., 1] < 100  # [40, 40] the rectangle's pixels
    # The map moved with the image, pixel for pixel.
    np.testing.assert_array_equal(out["segmentation"] == 5, red)
    # The box still covers exactly the drawn rectangle.
    bx0, by0, bx1, by1 = np.rint(out["boxes"][0] * 40).astype(int)
    ys, xs = np.nonzero(red)
    assert (bx0, by0, bx1, by1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert out["box_mask"].tolist() == [True]
    flips.add(bool(xs.min() != x0))
  assert flips == {True, False}  # both flipped and unflipped crops were checked
  del rng


def test_resize_keeps_maps_aligned_and_a_cropped_away_box_masked():
  image = np.full((64, 128, 3), 255, np.uint8)
  image[:, 64:] = 0
  seg = np.zeros((64, 128), np.int32)
  seg[:, 64:] = 1
  boxes = np.array([[0.0, 0.0, 0.1, 0.1], [0.55, 0.2, 0.9, 0.8]], np.float32)
  record = {"image": image, "segmentation": seg, "boxes": boxes, "box_labels": np.array([1, 2]),
            "box_mask": np.array([True, True])}
  out = transforms.ImageTransform(32)(record)  # 64x128 -> 32x64 -> centre crop 32x32 at x 16..48
  dark = transforms.to_uint8(out["image"])[..., 0] < 128
  np.testing.assert_array_equal(out["segmentation"] == 1, dark)
  assert out["box_mask"].tolist() == [False, True]  # the first box lies outside the crop


def test_loader_resumes_boxes_and_maps(shapes_folder):
  root, _ = shapes_folder
  src = _source(root)
  make = lambda: loader.make_loader(src, batch_size=2, seed=3, process_index=0, process_count=1,
                                    read_threads=1, read_buffer_size=4,
                                    transform=transforms.ImageTransform(24, random_crop=True,
                                                                        flip=True))
  it = make()
  next(it)
  next(it)
  state = it.get_state()
  want = next(it)
  assert want["boxes"].shape == (2, 3, 4) and want["segmentation"].shape == (2, 24, 24)
  assert want["box_mask"].dtype == bool
  it2 = make()
  it2.set_state(json.loads(json.dumps(state)))
  got = next(it2)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


# ---------------------------------------------------------------- refusals --------------------------
def _one_image_folder(tmp_path, boxes=None, map_array=None, map_name="a.png"):
  Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "a.png")
  if boxes is not None:
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "boxes": boxes}))
  if map_array is not None:
    os.makedirs(tmp_path / "maps", exist_ok=True)
    Image.fromarray(map_array).save(tmp_path / "maps" / map_name)
  return str(tmp_path)


@pytest.mark.parametrize("boxes, message", [
    ([[0, 0, 31.5, 10, 1]], r"metadata.jsonl:1: box 0 \[0, 0, 31.5, 10, 1\] is not inside the "
                            r"30x20 image; expected 0 <= x0 < x1 <= 30"),
    ([[5, 5, 2, 10, 1]], "box 0 .* is not inside"),
    ([[0, 0, 5, 5, 4]], r"metadata.jsonl:1: box 0 .* has class 4; expected an integer in \[0, 4\)"),
    ([[0, 0, 5, 5]], r"metadata.jsonl:1: box 0 is \[0, 0, 5, 5\]; expected \[x0, y0, x1, y1, class\]"),
    ("0 0 5 5", "metadata.jsonl:1: boxes=.*expected a list"),
])
def test_bad_boxes_name_file_entry_and_expectation(tmp_path, boxes, message):
  root = _one_image_folder(tmp_path, boxes=boxes)
  with pytest.raises(annotations.AnnotationError, match=message):
    ImageFolderSource(root, max_boxes=2, num_classes=4)


def test_bad_maps_name_the_map_and_the_expectation(tmp_path):
  root = _one_image_folder(tmp_path)
  with pytest.raises(annotations.AnnotationError, match=r"maps/a.png: no such segmentation map "
                                                        r"for image .*a.png"):
    ImageFolderSource(root, maps=True, num_classes=4)
  _one_image_folder(tmp_path, map_array=np.zeros((20, 20), np.uint8))
  with pytest.raises(annotations.AnnotationError, match=r"maps/a.png \(of image .*a.png\): map of "
                                                        r"20x20 px; expected the image's size 30x20"):
    ImageFolderSource(root, maps=True, num_classes=4)
  for verify in (True, False):
    bad = np.zeros((20, 30), np.uint8)
    bad[3, 3] = 4
    _one_image_folder(tmp_path, map_array=bad)
    if verify:
      with pytest.raises(annotations.AnnotationError, match=r"1 pixels hold class 4; expected "
                                                            r"class indices in \[0, 4\)"):
        ImageFolderSource(root, maps=True, num_classes=4)
    else:  # Only headers are read up front; the classes are checked when the map is read.
      src = ImageFolderSource(root, maps=True, num_classes=4, verify=False)
      with pytest.raises(annotations.AnnotationError, match="maps/a.png.*class 4"):
        src[0]
  _one_image_folder(tmp_path, map_array=np.zeros((20, 30, 3), np.uint8))
  with pytest.raises(annotations.AnnotationError, match="a RGB PNG; expected a single-channel"):
    ImageFolderSource(root, maps=True, num_classes=4)


def test_bad_coco_files_are_refused_naming_them(tmp_path):
  root = _one_image_folder(tmp_path)
  coco = tmp_path / "instances.json"
  with pytest.raises(annotations.AnnotationError, match="instances.json: no such file"):
    ImageFolderSource(root, max_boxes=2, num_classes=4, boxes_file=str(coco))
  good = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 9, "name": "x"}]}
  coco.write_text(json.dumps(dict(good, annotations=[
      {"image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 8}])))
  with pytest.raises(annotations.AnnotationError, match=r"annotations\[0\]: category_id=8"):
    ImageFolderSource(root, max_boxes=2, num_classes=4, boxes_file=str(coco))
  coco.write_text(json.dumps(dict(good, annotations=[
      {"image_id": 1, "bbox": [25, 0, 10, 5], "category_id": 9}])))
  with pytest.raises(annotations.AnnotationError, match=r"image id 1: box 0 .* not inside"):
    ImageFolderSource(root, max_boxes=2, num_classes=4, boxes_file=str(coco))
  coco.write_text(json.dumps(dict(good, images=[{"id": 1, "file_name": "b.png"}],
                                  annotations=[])))
  with pytest.raises(annotations.AnnotationError, match="none of its 1 images' file_name"):
    ImageFolderSource(root, max_boxes=2, num_classes=4, boxes_file=str(coco))
  with pytest.raises(ValueError, match="num_classes=0"):
    ImageFolderSource(root, max_boxes=2)


def test_maps_folder_is_never_scanned_for_images(shapes_folder):
  root, records = shapes_folder
  for kw in (dict(max_boxes=2, maps=False, num_classes=18), dict(max_boxes=0, maps=False)):
    src = ImageFolderSource(root, **kw)  # a layout model's or a plain reader of the same folder
    assert len(src) == len(records) and all("/maps/" not in f for f in src.files)
