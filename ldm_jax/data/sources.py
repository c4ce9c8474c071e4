"""The data sources by name: the one registry that the loader, the training pipeline and the config
checks read, so a source is named the same everywhere (`config.data.source` == `DataConfig.name`).

    kind = SOURCES["shapes"]                        # a SourceKind
    source = kind.build(DataConfig(name="shapes", size=64))
    kind.yields                                     # IMAGES: records hold 'image' uint8 [H, W, 3]
    config = data_config(experiment_config.data, seed=0,    # the experiment's `data` block,
                         model=experiment_config.model)     # and what its model's condition reads

A new source is a class with `__len__`, `__getitem__` and a `repr` that is stable across runs (the
loader's saved state names it), plus one entry in SOURCES: how to build it from a DataConfig, what
its records hold, and which DataConfig fields an experiment's `data` block sets. RECORD_KEYS names
every key a record may hold.
"""

import dataclasses
from typing import Any, Callable

from ldm_jax.data import annotations
from ldm_jax.data import folder
from ldm_jax.data import latent_cache
from ldm_jax.data import shapes
from ldm_jax.data import tfds_source
from ldm_jax.data import transforms

# What a source's records hold, which decides the transform the training pipeline applies.
IMAGES = "images"    # 'image' uint8 [H, W, 3] (+ label, caption, boxes): resized, cropped, flipped
LATENTS = "latents"  # 'latents' [h, w, c] already encoded and scaled (+ label, caption, text_emb)

# The keys of records, and what each holds.
RECORD_KEYS = {
    "image": "uint8 [H, W, 3]",
    "latents": "float32 [h, w, c], scaled first-stage latents (latent_cache)",
    "label": "int, the class (shapes; folders with labels_from_subfolders; tfds label_key)",
    "caption": "str (shapes; folders with caption_source; tfds caption_key)",
    annotations.BOXES: "float32 [N, 4] (x0, y0, x1, y1) fractions (shapes: N objects; folders: "
                       "max_boxes, padded; tfds boxes_key)",
    annotations.BOX_LABELS: "int32 [N], the class of each box",
    annotations.BOX_MASK: "bool [N], True = a real box, False = padding (folders); absent = all "
                          "real",
    annotations.SEGMENTATION: "int32 [H, W] class indices, the image's size (folders with maps; "
                              "tfds segmentation_key)",
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which source to build and its settings; `name` is a key of SOURCES."""
  name: str = "shapes"
  # shapes
  seed: int = 0  # base seed of the generated examples
  size: int = 64  # image size in pixels
  num_objects: int = 1  # 1, or 2 objects at distinct corners
  length: int = 10_000  # virtual length of the generated dataset
  # folder ("root") and latent_cache ("root" = cache directory)
  root: str = ""
  min_size: int = 0  # folder: drop images whose shorter side is smaller
  caption_source: str | None = None  # folder: None, "txt" or "jsonl"
  labels_from_subfolders: bool = False  # folder: class labels from sub-folder names
  max_boxes: int = 0  # folder: boxes per record, padded with a mask (0 = no boxes)
  boxes_file: str | None = None  # folder: COCO instances JSON (None = metadata.jsonl "boxes")
  maps: bool = False  # folder: a segmentation map per image in root/maps/
  num_classes: int = 0  # folder: classes of the boxes / map pixels
  # tfds
  tfds_name: str = ""
  split: str = "train"
  data_dir: str | None = None
  image_key: str = "image"
  label_key: str | None = None
  caption_key: str | None = None
  boxes_key: str | None = None  # tfds: the boxes' BBoxFeature sequence, e.g. 'objects/bbox'
  box_labels_key: str | None = None  # tfds: their classes, e.g. 'objects/label'
  segmentation_key: str | None = None  # tfds: a class-index image, e.g. 'annotation'


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One registered source."""
  build: Callable[[DataConfig], Any]  # DataConfig -> random-access source
  yields: str  # IMAGES or LATENTS
  # An experiment's `data` block (configs/common.py) -> the DataConfig fields of this source
  # beyond name, seed and size.
  settings: Callable[[Any], dict[str, Any]]
  # Images are drawn at DataConfig.size already, so they need no resize (only a crop or flip when
  # asked for); other image sources are resized and cropped by the pipeline.
  drawn_at_size: bool = False
  # Reads the boxes / maps a model's condition needs (`Annotations`) from files; other sources
  # either draw them (shapes) or have none.
  reads_annotations: bool = False


@dataclasses.dataclass(frozen=True)
class Annotations:
  """What a model's condition needs from an image source beside the image."""
  max_boxes: int = 0  # layout models: boxes padded to this many (0 = no boxes)
  maps: bool = False  # semantic-synthesis models: a segmentation map per image
  num_classes: int = 0  # classes of the boxes / map pixels (0 = neither is read)


def annotations_for(model) -> Annotations:
  """The Annotations that an experiment's `model` block conditions on: a layout model's boxes
  (`model.cond_stage.layout`: max_objects of num_classes) or a spatial rescaler's maps (one class
  per input channel)."""
  cond_stage = (model.get("cond_stage") if model is not None else None) or {}
  if cond_stage.get("layout"):
    coding = transforms.layout_coding(cond_stage)
    return Annotations(max_boxes=coding.max_objects, num_classes=coding.num_classes)
  if cond_stage.get("kind") == "spatial_rescaler":
    return Annotations(maps=True, num_classes=int(cond_stage["kwargs"]["in_channels"]))
  return Annotations()


SOURCES: dict[str, SourceKind] = {
    "shapes": SourceKind(
        build=lambda c: shapes.ShapesSource(seed=c.seed, size=c.size, num_objects=c.num_objects,
                                            length=c.length),
        yields=IMAGES,
        settings=lambda d: dict(num_objects=d.num_objects, length=d.num_examples),
        drawn_at_size=True),
    "folder": SourceKind(
        build=lambda c: folder.ImageFolderSource(
            c.root, min_size=c.min_size, caption_source=c.caption_source,
            labels_from_subfolders=c.labels_from_subfolders, max_boxes=c.max_boxes,
            boxes_file=c.boxes_file, maps=c.maps, num_classes=c.num_classes),
        yields=IMAGES,
        settings=lambda d: dict(root=d.data_dir, min_size=d.min_size,
                                caption_source="txt" if d.caption_key else None,
                                labels_from_subfolders=bool(d.label_key),
                                boxes_file=d.get("boxes_file") or None),
        reads_annotations=True),
    "tfds": SourceKind(
        build=lambda c: tfds_source.TfdsSource(
            c.tfds_name, c.split, c.data_dir, image_key=c.image_key, label_key=c.label_key,
            caption_key=c.caption_key, max_boxes=c.max_boxes, boxes_key=c.boxes_key,
            box_labels_key=c.box_labels_key, maps=c.maps, segmentation_key=c.segmentation_key,
            num_classes=c.num_classes),
        yields=IMAGES,
        settings=lambda d: dict(tfds_name=d.name, split=d.split, data_dir=d.data_dir or None,
                                image_key=d.image_key, label_key=d.label_key or None,
                                caption_key=d.caption_key or None,
                                boxes_key=d.get("boxes_key") or None,
                                box_labels_key=d.get("box_labels_key") or None,
                                segmentation_key=d.get("segmentation_key") or None),
        reads_annotations=True),
    "latent_cache": SourceKind(
        build=lambda c: latent_cache.LatentCacheSource(c.root),
        yields=LATENTS,
        settings=lambda d: dict(root=d.data_dir)),
}
NAMES = tuple(SOURCES)


def get(name: str, field: str = "data name") -> SourceKind:
  """The registered source `name`; ValueError naming `field`, the value and the names known."""
  if name not in SOURCES:
    raise ValueError(f"{field}={name!r}; expected one of {list(NAMES)}")
  return SOURCES[name]


def data_config(data, seed: int, model=None) -> DataConfig:
  """The DataConfig of an experiment's `data` block (`config.data`), with the run's seed; with the
  experiment's `model` block, a source that reads annotations reads the ones its condition needs."""
  kind = get(data.source, "config.data.source")
  extra = {}
  if kind.reads_annotations:
    extra = dataclasses.asdict(annotations_for(model))
  return DataConfig(name=data.source, seed=seed, size=data.image_size, **kind.settings(data),
                    **extra)
