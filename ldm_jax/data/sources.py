"""The data sources by name: the one registry that the loader, the training pipeline and the config
checks read, so a source is named the same everywhere (`config.data.source` == `DataConfig.name`).

    kind = SOURCES["shapes"]                        # a SourceKind
    source = kind.build(DataConfig(name="shapes", size=64))
    kind.yields                                     # IMAGES: records hold 'image' uint8 [H, W, 3]
    config = data_config(experiment_config.data, seed=0)   # the experiment's `data` block

A new source is a class with `__len__`, `__getitem__` and a `repr` that is stable across runs (the
loader's saved state names it), plus one entry in SOURCES: how to build it from a DataConfig, what
its records hold, and which DataConfig fields an experiment's `data` block sets.
"""

import dataclasses
from typing import Any, Callable

from ldm_jax.data import folder
from ldm_jax.data import latent_cache
from ldm_jax.data import shapes
from ldm_jax.data import tfds_source

# What a source's records hold, which decides the transform the training pipeline applies.
IMAGES = "images"    # 'image' uint8 [H, W, 3] (+ label, caption, boxes): resized, cropped, flipped
LATENTS = "latents"  # 'latents' [h, w, c] already encoded and scaled (+ label, caption, text_emb)


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
  # tfds
  tfds_name: str = ""
  split: str = "train"
  data_dir: str | None = None
  image_key: str = "image"
  label_key: str | None = None
  caption_key: str | None = None


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
            labels_from_subfolders=c.labels_from_subfolders),
        yields=IMAGES,
        settings=lambda d: dict(root=d.data_dir, min_size=d.min_size,
                                caption_source="txt" if d.caption_key else None,
                                labels_from_subfolders=bool(d.label_key))),
    "tfds": SourceKind(
        build=lambda c: tfds_source.TfdsSource(
            c.tfds_name, c.split, c.data_dir, image_key=c.image_key, label_key=c.label_key,
            caption_key=c.caption_key),
        yields=IMAGES,
        settings=lambda d: dict(tfds_name=d.name, split=d.split, data_dir=d.data_dir or None,
                                image_key=d.image_key, label_key=d.label_key or None,
                                caption_key=d.caption_key or None)),
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


def data_config(data, seed: int) -> DataConfig:
  """The DataConfig of an experiment's `data` block (`config.data`), with the run's seed."""
  kind = get(data.source, "config.data.source")
  return DataConfig(name=data.source, seed=seed, size=data.image_size, **kind.settings(data))
