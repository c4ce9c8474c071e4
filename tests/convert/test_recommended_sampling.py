"""Imported Stable Diffusion models carry the guidance scale SD front ends default to (7.5), saved
with the converted model, so sampling them with only a prompt is guided as users expect."""

import os

import pytest

import tiny_sd
from ldm_jax import ldm as ldm_lib
from ldm_jax.convert import pipeline
from ldm_jax.models.tokenizers import write_clip_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return write_clip_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "clip_tokenizer"))


def test_diffusers_sd_recommends_7_5_and_keeps_it_when_saved(tokenizer_dir, tmp_path):
  folder, _ = tiny_sd.diffusers_folder(str(tmp_path), tokenizer_dir)
  model = ldm_lib.LatentDiffusion.from_diffusers(folder)
  s = model.sampling_settings()
  assert s["guidance"] == 7.5 and s["source"]["guidance"] == "model"
  assert model.sampling_settings(guidance=2.0)["guidance"] == 2.0  # An explicit value wins.
  out = str(tmp_path / "converted")
  model.save(out)
  assert ldm_lib.LatentDiffusion.from_checkpoint(out).sampling_settings()["guidance"] == 7.5


def test_compvis_sd_recommends_7_5(tokenizer_dir, tmp_path):
  text = tiny_sd.clip_text_model(seed=8)
  text_dir = os.path.join(str(tmp_path), "text_model")
  text.save_pretrained(text_dir)
  unet, first_stage, ema = tiny_sd.compvis_modules()
  ckpt, yaml_path = tiny_sd.compvis_checkpoint(
      str(tmp_path), text_dir, tiny_sd.compvis_state_dict(unet, first_stage, ema, text))
  config, _ = pipeline.load_compvis(ckpt, yaml_path, tokenizer_path=tokenizer_dir)
  assert config.cond_stage.kind == "clip"
  assert config.sampling.to_dict() == {"sampler": "ddim", "steps": 50, "guidance": 7.5}


@pytest.mark.parametrize("kind, guidance", [("clip", 7.5), ("openclip", 7.5), ("ldm_bert", 5.0),
                                            ("class", None), ("none", None)])
def test_recommendation_by_text_encoder(kind, guidance):
  got = pipeline.recommended_sampling(kind)
  assert got.get("guidance") == guidance
