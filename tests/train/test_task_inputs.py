"""The conditioning inputs that training makes on the host (`ldm_task.task_inputs`) for the paper's
super-resolution, layout and semantic-synthesis configs: the SR degradation the config names, boxes
through the model's layout coding (padding left out), and a batch's own segmentation maps.

No parameters are needed: the models are built without them."""

import importlib

import numpy as np
import pytest

from ldm_jax import ldm
from ldm_jax import validate
from ldm_jax.data import annotations
from ldm_jax.data import shapes
from ldm_jax.data import sources
from ldm_jax.data import transforms
from ldm_jax.errors import ConfigError
from ldm_jax.train import ldm_task


def _setup(module: str, variant: str = "tiny"):
  cfg = importlib.import_module(f"configs.{module}").get_config(variant)
  return cfg, ldm.LatentDiffusion(cfg.model, {})


def _images(n=2, size=64, num_objects=1):
  records = [shapes.render_shapes(0, i, size=size, num_objects=num_objects) for i in range(n)]
  return records, np.stack([transforms.to_float(r["image"]) for r in records])


def test_sr_degradation_follows_the_config():
  for variant in ("", "tiny"):  # The released bsr_sr model's degradation, in both variants.
    assert _setup("sr_openimages_x4", variant)[0].data.degradation == transforms.BSR
  cfg, model = _setup("sr_openimages_x4")
  _, images = _images()
  run = lambda seed: ldm_task.task_inputs(model, {"image": images}, cfg,
                                          np.random.default_rng(seed))["concat"]
  bsr, again, other = run(0), run(0), run(1)
  bicubic = np.stack([transforms.to_float(transforms.bicubic_down(transforms.to_uint8(x), 4))
                      for x in images])
  assert bsr.shape == bicubic.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(bsr, again)  # A function of the generator ...
  assert np.abs(bsr - other).mean() > 1e-3  # ... which draws the blur, noise and JPEG quality.
  assert np.abs(bsr - bicubic).mean() > 1e-2
  cfg.data.degradation = transforms.BICUBIC
  np.testing.assert_array_equal(run(0), bicubic)
  cfg.data.degradation = "nearest"
  with pytest.raises(ConfigError, match=r"config.data.degradation='nearest': expected one of "
                                        r"\['bicubic', 'bsr'\]"):
    validate.check_config(cfg)


def test_layout_tokens_leave_out_padded_boxes():
  cfg, model = _setup("layout2img")
  coding = transforms.layout_coding(model.cond_stage_config)
  assert coding == transforms.LayoutCoding(grid=16, num_classes=18, max_objects=2)
  boxes = np.array([[[0.1, 0.1, 0.4, 0.5], [0.6, 0.6, 0.9, 0.9]],
                    [[0.2, 0.2, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  labels = np.array([[3, 17], [5, 0]], np.int32)
  batch = {"image": np.zeros((2, 64, 64, 3), np.float32), "boxes": boxes, "box_labels": labels,
           "box_mask": np.array([[True, True], [True, False]])}
  tokens = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))["tokens"]
  pad = transforms.layout_vocab_size(16, 18) - 1
  np.testing.assert_array_equal(tokens[0], transforms.layout_tokens(
      boxes[0], labels[0], grid=16, num_classes=18, max_objects=2))
  np.testing.assert_array_equal(tokens[1][3:], [pad] * 3)  # Padding, not a box of class 0.
  assert tokens[1][0] == 16 * 16 + 5
  without_mask = dict(batch)
  del without_mask["box_mask"]  # Shapes batches: every box is real.
  assert ldm_task.task_inputs(model, without_mask, cfg, np.random.default_rng(0))["tokens"][1][3] \
      != pad


def test_layout_coding_is_checked_against_the_transformer():
  cfg, _ = _setup("layout2img", "")
  assert sources.annotations_for(cfg.model) == sources.Annotations(max_boxes=30, num_classes=601)
  validate.check_config(cfg, num_devices=1)
  cfg.model.cond_stage.layout.max_objects = 40
  with pytest.raises(ConfigError, match=r"config.model.cond_stage.layout.max_objects=40 makes 120 "
                                        r"tokens; expected at most the transformer's max_length=92"):
    validate.check_config(cfg, num_devices=1)
  cfg.model.cond_stage.layout.max_objects = 30
  cfg.model.cond_stage.layout.grid = 100
  with pytest.raises(ConfigError, match="need 10602 tokens; expected at most the transformer's "
                                        "vocab_size=8192"):
    validate.check_config(cfg, num_devices=1)
  with pytest.raises(ValueError, match="model.cond_stage.layout is missing"):
    transforms.layout_coding({"kind": "ldm_bert", "kwargs": {}})


def test_semantic_maps_of_the_batch_replace_the_shapes_maps():
  cfg, model = _setup("semantic_synthesis")
  records, images = _images(num_objects=2)
  batch = {"image": images, "boxes": [r["boxes"] for r in records],
           "box_labels": [r["box_labels"] for r in records]}
  drawn = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))["seg"]
  assert drawn.shape == (2, 64, 64, 19) and drawn[..., 1:].sum() > 0
  maps = np.zeros((2, 64, 64), np.int32)
  maps[:, :, 32:] = 7
  maps[1, :10] = 18
  seg = ldm_task.task_inputs(model, dict(batch, segmentation=maps), cfg,
                             np.random.default_rng(0))["seg"]
  np.testing.assert_array_equal(seg, annotations.one_hot(maps, 19))
  np.testing.assert_array_equal(seg.argmax(-1), maps)
  assert sources.annotations_for(cfg.model) == sources.Annotations(maps=True, num_classes=19)
