"""Smoke test of every config family: its tiny variant trains 2 steps on CPU through train.py's entry
point, and the result samples (2 sampler steps) through LatentDiffusion.

Autoencoder families (KL-f8, VQ-f4, VQ-f4 without attention) are trained first and serve as the
first stages of the LDM families that use them. The layout and semantic families train on a folder
of real-format data (images, metadata.jsonl boxes, maps/ PNGs, written from the shapes renderer),
and the test checks that the folder's boxes / maps are what reached the model. The families with a
spatial or box condition (super-resolution, layout, semantic) must change their samples when the
condition changes.
"""

import importlib

import jax
import numpy as np
import pytest

from folder_util import write_shapes_folder
from ldm_jax import ldm
from ldm_jax import sampling
from ldm_jax.cli import train as entry
from ldm_jax.data import annotations
from ldm_jax.data import transforms
from ldm_jax.train import inputs
from ldm_jax.train import ldm_task

AUTOENCODERS = {  # name -> (config module, overrides of the tiny variant)
    "vq_f4": ("vq_f4", {}),
    "vq_f4_noattn": ("vq_f4", {"attn_type": "none"}),
    "kl_f8": ("kl_f8", {}),
}
LDM_FAMILIES = {  # name -> (config module, first stage)
    "unconditional_vq": ("celebahq_ldm_vq4", "vq_f4"),
    "unconditional_kl_scale_shift": ("lsun_churches_ldm_kl8", "kl_f8"),
    "class": ("cin256_v2", "vq_f4"),
    "text_joint_transformer": ("txt2img_laion", "kl_f8"),
    "super_resolution": ("sr_openimages_x4", "vq_f4"),
    "inpainting": ("inpainting_vq4", "vq_f4_noattn"),
    "layout": ("layout2img", "vq_f4"),
    "semantic": ("semantic_synthesis", "vq_f4"),
    "stable_diffusion_1": ("sd_v1_finetune", "kl_f8"),
}
FOLDER_FAMILIES = ("layout", "semantic")  # trained on real-format folders
CONDITIONED = ("super_resolution", "layout", "semantic")  # samples must follow the condition


def tiny(module: str):
  cfg = importlib.import_module(f"configs.{module}").get_config("tiny")
  cfg.mesh.num_devices = 1  # One of the 8 fake devices: sharding has its own tests.
  return cfg


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("family_aes")
  out = {}
  for name, (module, overrides) in AUTOENCODERS.items():
    cfg = tiny(module)
    for k, v in overrides.items():
      cfg.model.first_stage.kwargs[k] = v
    summary = entry.train(cfg, str(root / name))
    assert summary["step"] == cfg.train.num_steps and np.isfinite(summary["loss"])
    out[name] = str(root / name)
  return out


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
  """(root, records): 8 two-object shapes images at 64 px with boxes and maps."""
  root = tmp_path_factory.mktemp("family_folder")
  return str(root), write_shapes_folder(root, n=8, size=64, num_objects=2)


def check_folder_reached_the_model(model, cfg, records) -> None:
  """The training pipeline's batch holds the folder's boxes / maps, and the step's inputs are made
  of them: the layout tokens of its boxes, the one-hot of its maps."""
  pipeline = inputs.make_pipeline(cfg)
  batch = pipeline.next()
  folder_images = np.stack([transforms.to_float(r["image"]) for r in records])  # [N, H, W, 3]
  found = []
  for im in np.asarray(batch["image"]):
    hits = np.flatnonzero((folder_images == im).all(axis=(1, 2, 3)))
    assert len(hits) == 1, "a batch image is none of the folder's images"
    found.append(records[hits[0]])
  encoded = ldm_task.encode_batch(model, batch, jax.random.key(0), cfg)
  if model.cond_kind == "spatial_rescaler":
    want = np.stack([r["map"] for r in found])  # [B, H, W]
    np.testing.assert_array_equal(batch["segmentation"], want)
    np.testing.assert_array_equal(np.asarray(encoded["seg"]), annotations.one_hot(want, 19))
  else:
    coding = transforms.layout_coding(model.cond_stage_config)
    want = np.stack([coding.tokens(np.asarray(r["pixel_boxes"])[:, :4] / 64,
                                   [b[4] for b in r["pixel_boxes"]]) for r in found])
    np.testing.assert_array_equal(batch["box_mask"], True)  # two objects, max_objects 2
    np.testing.assert_array_equal(np.asarray(encoded["tokens"]), want)


def swapped(inputs_: dict) -> dict:
  """The same sampling inputs with the two samples' conditions exchanged (seeds unchanged)."""
  return {k: v[::-1] if k in ("images", "tokens") else v for k, v in inputs_.items()}


def sample_inputs(model: ldm.LatentDiffusion, cfg) -> dict:
  """Family-appropriate conditioning for 2 samples."""
  from ldm_jax.data import shapes
  from ldm_jax.train import ldm_task
  records = [shapes.render_shapes(0, i, size=cfg.data.image_size,
                                  num_objects=cfg.data.num_objects) for i in range(2)]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
  batch = {"image": images, "boxes": [r["boxes"] for r in records],
           "box_labels": [r["box_labels"] for r in records]}
  extra = ldm_task.task_inputs(model, batch, cfg, np.random.default_rng(0))
  if "concat" in extra:
    return {"images": extra["concat"]}
  if "inpaint_mask" in extra:
    return {"init_image": images, "mask": extra["inpaint_mask"]}
  if "tokens" in extra:
    return {"tokens": extra["tokens"]}
  if "seg" in extra:
    return {"images": extra["seg"]}
  if model.is_text:
    return {"prompts": [r["caption"] for r in records], "guidance": 2.0}
  if model.cond_kind == "class":
    return {"labels": [1, 5], "guidance": 2.0}
  return {"num_samples": 2}


@pytest.mark.parametrize("family", sorted(LDM_FAMILIES))
def test_family_trains_and_samples(family, autoencoders, shapes_folder, tmp_path):
  module, first_stage = LDM_FAMILIES[family]
  cfg = tiny(module)
  cfg.first_stage_checkpoint = autoencoders[first_stage]
  if family in FOLDER_FAMILIES:
    cfg.data.source, cfg.data.data_dir = "folder", shapes_folder[0]
  summary = entry.train(cfg, str(tmp_path / family))
  assert summary["step"] == cfg.train.num_steps and np.isfinite(summary["loss"])
  model = ldm.LatentDiffusion.from_checkpoint(str(tmp_path / family))
  if family in FOLDER_FAMILIES:
    check_folder_reached_the_model(model, cfg, shapes_folder[1])
  conditions = sample_inputs(model, cfg)
  out = sampling.sample(model, steps=2, seed=0, **conditions)
  size = cfg.data.image_size
  assert out.shape == (2, size, size, 3) and np.all(np.isfinite(out))
  if family in CONDITIONED:
    other = sampling.sample(model, steps=2, seed=0, **swapped(conditions))
    diff = np.abs(out - other).mean(axis=(1, 2, 3))  # [2]
    assert np.all(diff > 1e-3), diff  # Each sample follows its own condition.
