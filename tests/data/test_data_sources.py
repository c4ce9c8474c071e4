"""The source registry: one vocabulary for config.data.source, DataConfig.name and the checks."""

import ml_collections
import pytest

from configs import common
from ldm_jax import validate
from ldm_jax.data import latent_cache
from ldm_jax.data import loader
from ldm_jax.data import shapes
from ldm_jax.data import sources
from ldm_jax.train import inputs


def _config(source: str, **data):
  c = common.base_config()
  c.data.source = source
  c.data.update(data)
  return c


def test_one_vocabulary():
  assert sources.NAMES == ("shapes", "folder", "tfds", "latent_cache")
  # The experiment config's name is the DataConfig's name, for every source.
  for name in sources.NAMES:
    assert inputs.data_config(_config(name, data_dir="/d", name="ds")).name == name
  assert sources.SOURCES["latent_cache"].yields == sources.LATENTS
  assert {sources.SOURCES[n].yields for n in ("shapes", "folder", "tfds")} == {sources.IMAGES}


def test_experiment_settings_reach_the_source():
  dc = inputs.data_config(_config("shapes", num_objects=2, num_examples=7, image_size=16))
  assert (dc.num_objects, dc.length, dc.size, dc.seed) == (2, 7, 16, 0)
  src = loader.make_dataset(dc)
  assert isinstance(src, shapes.ShapesSource) and len(src) == 7 and src.size == 16
  dc = inputs.data_config(_config("tfds", name="celeb_a_hq/256", data_dir="", label_key="y"))
  assert (dc.tfds_name, dc.data_dir, dc.label_key, dc.caption_key) == (
      "celeb_a_hq/256", None, "y", None)
  dc = inputs.data_config(_config("folder", data_dir="/imgs", caption_key="txt", min_size=9))
  assert (dc.root, dc.caption_source, dc.min_size, dc.labels_from_subfolders) == (
      "/imgs", "txt", 9, False)


def test_latent_cache_by_its_config_name(tmp_path):
  out = str(tmp_path / "cache")
  latent_cache.build_latent_cache(shapes.ShapesSource(size=8, length=3),
                                  lambda x: x[:, ::4, ::4, :2], out, batch_size=3)
  src = loader.make_dataset(inputs.data_config(_config("latent_cache", data_dir=out)))
  assert isinstance(src, latent_cache.LatentCacheSource) and src[0]["latents"].shape == (2, 2, 2)


def test_unknown_source_is_refused_by_each_reader():
  with pytest.raises(ValueError, match=r"config.data.source='latents'; expected one of \['shapes'"):
    inputs.data_config(_config("latents"))
  with pytest.raises(ValueError, match=r"config.data.source='latents': expected one of"):
    validate.check_config(_config("latents"))
  with pytest.raises(ValueError, match="data name='latents'"):
    loader.make_dataset(ml_collections.ConfigDict({"name": "latents"}))


def test_folders_read_the_annotations_their_model_conditions_on():
  from configs import layout2img, semantic_synthesis, shapes_ldm_text
  got = {}
  for name, module in (("layout", layout2img), ("semantic", semantic_synthesis),
                       ("text", shapes_ldm_text)):
    c = module.get_config("tiny")
    c.data.source, c.data.data_dir, c.data.boxes_file = "folder", "/imgs", "/imgs/instances.json"
    dc = inputs.data_config(c)
    got[name] = (dc.max_boxes, dc.num_classes, dc.maps)
    assert dc.boxes_file == "/imgs/instances.json"
  # Layout: the coding's max_objects boxes of its classes; semantic: a map of the rescaler's
  # input classes; a text model reads neither.
  assert got == {"layout": (2, 18, False), "semantic": (0, 19, True), "text": (0, 0, False)}
  for key in ("boxes", "box_labels", "box_mask", "segmentation"):
    assert key in sources.RECORD_KEYS
