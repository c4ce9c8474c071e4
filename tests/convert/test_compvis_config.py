"""Tests for ldm_jax.convert.compvis_config: hand-written YAMLs shaped like the original CompVis / SD
configs translate into the expected model-config dicts, and the translated SD configs build networks
with exactly the parameter counts of the released models."""

import json
import os

import pytest
import yaml

from ldm_jax.convert.compvis_config import (TEXT_MODELS, CompVisConfigError, load_compvis_config,
                                            translate_compvis_config)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _load(name, **kw):
  return load_compvis_config(os.path.join(FIXTURES, name + ".yaml"), **kw)


def _yaml(name):
  with open(os.path.join(FIXTURES, name + ".yaml")) as f:
    return yaml.safe_load(f)


SD_UNET_COMMON = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1),
    num_res_blocks=2, channel_mult=(1, 2, 4, 4), dropout=0.0, conv_resample=True,
    num_classes=None, adm_in_channels=None, num_heads_upsample=-1, use_scale_shift_norm=False,
    resblock_updown=False, use_spatial_transformer=True, transformer_depth=1,
    disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
    legacy=False)
KL_F8 = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
             ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0,
             resamp_with_conv=True, attn_type="vanilla", tanh_out=False, embed_dim=4)
VQ_F4 = dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
             ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0,
             resamp_with_conv=True, attn_type="vanilla", tanh_out=False, embed_dim=3,
             n_embed=8192)
DIFFUSION_DEFAULTS = dict(
    timesteps=1000, beta_schedule="linear", cosine_s=8e-3, given_betas=None,
    parameterization="eps", loss_type="l2", l_simple_weight=1.0, original_elbo_weight=0.0,
    v_posterior=0.0, learn_logvar=False, logvar_init=0.0, num_timesteps_cond=1,
    scale_by_std=False, model_target="LatentDiffusion")


def test_sd_v1_full_translation():
  want = dict(
      first_stage=dict(kind="kl", kwargs=KL_F8),
      unet=dict(SD_UNET_COMMON, num_heads=8, num_head_channels=-1, context_dim=768,
                use_linear_in_transformer=False),
      cond_stage=dict(kind="clip", version="openai/clip-vit-large-patch14", trainable=False,
                      tokenizer=dict(kind="clip", path=None),
                      kwargs=dict(vocab_size=49408, max_length=77, width=768, layers=12, heads=12,
                                  mlp_dim=3072, activation="quick_gelu", epsilon=1e-5,
                                  output_layer="last")),
      diffusion=dict(DIFFUSION_DEFAULTS, linear_start=0.00085, linear_end=0.012,
                     conditioning_key="crossattn", scale_factor=0.18215, use_ema=False,
                     first_stage_key="jpg", cond_stage_key="txt", image_size=64, channels=4))
  assert _load("sd_v1_inference") == want


def test_sd_v2_v_model():
  got = _load("sd_v2_v")
  assert got["unet"] == dict(SD_UNET_COMMON, num_heads=-1, num_head_channels=64,
                             context_dim=1024, use_linear_in_transformer=True)
  assert got["first_stage"] == dict(kind="kl", kwargs=KL_F8)  # vanilla-xformers -> vanilla
  assert got["cond_stage"] == dict(
      kind="openclip", arch="ViT-H-14", version="laion2b_s32b_b79k", trainable=False,
      tokenizer=dict(kind="openclip", path=None),
      kwargs=dict(vocab_size=49408, max_length=77, width=1024, layers=24, heads=16, mlp_dim=4096,
                  activation="gelu", epsilon=1e-5, output_layer="penultimate"))
  d = got["diffusion"]
  assert (d["parameterization"], d["conditioning_key"], d["scale_factor"], d["image_size"]) == \
      ("v", "crossattn", 0.18215, 96)


def test_sd_v2_inpainting():
  got = _load("sd_v2_inpainting")
  assert got["unet"]["in_channels"] == 9 and got["unet"]["out_channels"] == 4
  d = got["diffusion"]
  assert d["model_target"] == "LatentInpaintDiffusion" and d["conditioning_key"] == "hybrid"
  assert d["concat_keys"] == ("mask", "masked_image") and d["masked_image_key"] == "masked_image"


def test_ldm_txt2img_bert():
  got = _load("txt2img_ldm_bert")
  assert got["cond_stage"] == dict(
      kind="ldm_bert", trainable=True, tokenizer=dict(kind="bert", path=None),
      kwargs=dict(vocab_size=30522, max_length=77, width=1280, depth=32, heads=8, head_dim=64,
                  mlp_ratio=4, epsilon=1e-5))
  assert got["unet"]["context_dim"] == 1280 and got["unet"]["num_heads"] == 8
  assert got["diffusion"]["scale_factor"] == 0.18215


def test_cin256_v2_class_conditional_vq():
  got = _load("cin256_v2")
  assert got["first_stage"] == dict(kind="vq", kwargs=VQ_F4)
  assert got["cond_stage"] == dict(kind="class", key="class_label", trainable=True,
                                   kwargs=dict(n_classes=1001, embed_dim=512, ucg_rate=0.0))
  u = got["unet"]
  assert (u["model_channels"], u["channel_mult"], u["attention_resolutions"], u["num_heads"],
          u["context_dim"], u["legacy"]) == (192, (1, 2, 3, 5), (8, 4, 2), 1, 512, True)
  d = got["diffusion"]
  assert (d["linear_start"], d["linear_end"], d["conditioning_key"], d["scale_factor"]) == \
      (0.0015, 0.0195, "crossattn", 1.0)


def test_lsun_churches_scale_by_std():
  got = _load("lsun_churches_kl8")
  d = got["diffusion"]
  # Unconditional: no conditioning key; scale_by_std: the factor lives only in the checkpoint.
  assert d["conditioning_key"] is None
  assert d["scale_by_std"] is True and d["scale_factor"] is None
  assert d["loss_type"] == "l1" and d["linear_end"] == 0.0155
  assert got["cond_stage"] == dict(kind="none", kwargs={}, trainable=False)
  u = got["unet"]
  assert (u["channel_mult"], u["attention_resolutions"], u["use_scale_shift_norm"],
          u["resblock_updown"], u["use_spatial_transformer"]) == \
      ((1, 2, 2, 4, 4), (1, 2, 4, 8), True, True, False)
  assert got["first_stage"] == dict(kind="kl", kwargs=KL_F8)


def test_celebahq_unconditional_vq():
  got = _load("celebahq_vq4")
  assert got["first_stage"] == dict(kind="vq", kwargs=VQ_F4)
  assert got["cond_stage"]["kind"] == "none" and got["diffusion"]["conditioning_key"] is None
  assert (got["unet"]["num_head_channels"], got["unet"]["num_heads"]) == (32, -1)
  assert got["diffusion"]["use_ema"] is True  # the DDPM default when the YAML says nothing


@pytest.mark.parametrize("name, in_ch, cond", [
    ("bsr_sr", 6, dict(kind="identity", kwargs={}, trainable=False)),
    ("inpainting_big", 7, dict(kind="first_stage", kwargs={}, trainable=False)),
    ("semantic_synthesis", 6, dict(kind="spatial_rescaler", trainable=True, kwargs=dict(
        n_stages=2, method="bilinear", multiplier=0.5, in_channels=182, out_channels=3,
        bias=False))),
])
def test_concat_models(name, in_ch, cond):
  got = _load(name)
  # No conditioning_key in these YAMLs: LatentDiffusion's concat_mode default (True) picks concat.
  assert got["diffusion"]["conditioning_key"] == "concat"
  assert got["unet"]["in_channels"] == in_ch
  assert got["cond_stage"] == cond
  if name == "inpainting_big":
    assert got["first_stage"]["kwargs"]["attn_type"] == "none"


def test_layout_box_tokens():
  got = _load("layout2img")
  assert got["cond_stage"] == dict(
      kind="ldm_bert", trainable=True, tokenizer=dict(kind=None, path=None),
      kwargs=dict(vocab_size=8192, max_length=92, width=512, depth=16, heads=8, head_dim=64,
                  mlp_ratio=4, epsilon=1e-5))
  assert got["unet"]["transformer_depth"] == 3 and got["unet"]["context_dim"] == 512


def test_unknown_target_names_path_and_target():
  path = os.path.join(FIXTURES, "unknown_cond_target.yaml")
  with pytest.raises(CompVisConfigError) as info:
    load_compvis_config(path)
  msg = str(info.value)
  assert path in msg and "model.params.cond_stage_config.target" in msg
  assert "FrozenT5Embedder" in msg

  cfg = _yaml("sd_v1_inference")
  cfg["model"]["params"]["first_stage_config"]["target"] = "ldm.models.autoencoder.Mystery"
  with pytest.raises(CompVisConfigError, match=r"first_stage_config.target=.*Mystery"):
    translate_compvis_config(cfg)
  cfg = _yaml("sd_v1_inference")
  cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentUpscaleFinetuneDiffusion"
  with pytest.raises(CompVisConfigError, match="model.target=.*LatentUpscaleFinetuneDiffusion"):
    translate_compvis_config(cfg)
  # The x4 upscaler is supported, but not without the schedule of its low-resolution input.
  cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
  with pytest.raises(CompVisConfigError, match="model.params.low_scale_config.target is missing"):
    translate_compvis_config(cfg)


def test_unknown_and_missing_fields_are_errors():
  cfg = _yaml("sd_v1_inference")
  cfg["model"]["params"]["unet_config"]["params"]["mystery_width"] = 3
  with pytest.raises(CompVisConfigError, match=r"unet_config.params: unknown fields \['mystery"):
    translate_compvis_config(cfg)
  cfg = _yaml("sd_v1_inference")
  del cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["z_channels"]
  with pytest.raises(CompVisConfigError, match=r"ddconfig: required fields \['z_channels'\]"):
    translate_compvis_config(cfg)
  cfg = _yaml("sd_v1_inference")
  cfg["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
  with pytest.raises(CompVisConfigError, match="use_new_attention_order=True"):
    translate_compvis_config(cfg)


def test_numbers_written_without_a_dot():
  # PyYAML reads `1e-4` as a string (YAML 1.1); the original code (omegaconf) reads a float.
  cfg = yaml.safe_load(open(os.path.join(FIXTURES, "sd_v1_inference.yaml")).read()
                       .replace("linear_start: 0.00085", "linear_start: 1e-4"))
  assert translate_compvis_config(cfg)["diffusion"]["linear_start"] == 1e-4
  cfg["model"]["params"]["linear_end"] = "fast"
  with pytest.raises(CompVisConfigError, match="linear_end='fast'; expected a number"):
    translate_compvis_config(cfg)


def test_text_model_names_offline(tmp_path):
  cfg = _yaml("sd_v1_inference")
  cfg["model"]["params"]["cond_stage_config"]["params"] = {"version": "someone/my-clip"}
  with pytest.raises(CompVisConfigError, match="not a known text model.*local directory"):
    translate_compvis_config(cfg)
  # A local HF CLIP config directory supplies the architecture instead.
  local = tmp_path / "my-clip"
  local.mkdir()
  (local / "config.json").write_text(json.dumps({"text_config": dict(
      vocab_size=1000, max_position_embeddings=32, hidden_size=64, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=128, hidden_act="gelu", layer_norm_eps=1e-6)}))
  cfg["model"]["params"]["cond_stage_config"]["params"] = {"version": str(local),
                                                           "max_length": 32}
  got = translate_compvis_config(cfg)["cond_stage"]["kwargs"]
  assert got == dict(vocab_size=1000, max_length=32, width=64, layers=2, heads=4, mlp_dim=128,
                     activation="gelu", epsilon=1e-6, output_layer="last")
  assert set(TEXT_MODELS) >= {"openai/clip-vit-large-patch14", "ViT-H-14"}


def test_yaml_file_errors(tmp_path):
  with pytest.raises(CompVisConfigError, match="cannot read"):
    load_compvis_config(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed")
  with pytest.raises(CompVisConfigError, match="not valid YAML"):
    load_compvis_config(bad)


@pytest.mark.parametrize("name, unet_params", [("sd_v1_inference", 859_520_964),
                                               ("sd_v2_v", 865_910_724)])
def test_translated_sd_configs_build_the_released_sizes(name, unet_params):
  """The published parameter counts of the SD UNets and the kl-f8 autoencoder (83,653,863) are
  reproduced by building our networks from the translated configs (shapes only, no memory)."""
  import jax
  import jax.numpy as jnp
  from ldm_jax.models import build

  def count(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))

  cfg = _load(name)
  unet = build.build_unet(cfg["unet"])
  shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                          jnp.zeros((1,)), jnp.zeros((1, 2, cfg["unet"]["context_dim"])))
  assert count(shapes) == unet_params
  ae = build.build_first_stage(cfg["first_stage"])
  shapes = jax.eval_shape(ae.init, {"params": jax.random.PRNGKey(0),
                                    "sample": jax.random.PRNGKey(1)}, jnp.zeros((1, 16, 16, 3)))
  assert count(shapes) == 83_653_863
