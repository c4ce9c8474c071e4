"""Tests of the experiment configs in configs/ (the paper's zoo and the shapes quickstarts).

Nothing is trained or allocated. Every config loads in both variants and passes
`ldm_jax.validate.check_config`; the tiny variants build their networks through
`ldm_jax.models.build` under `jax.eval_shape` with the sections fitting together (the full-size
builds and parameter counts are in test_configs_full.py). The paper's LDMs are compared with
independent references, the original CompVis / Stable Diffusion YAMLs in tests/convert/fixtures
translated by `compvis_config.load_compvis_config`; invalid edits of the configs must be refused by
check_config with a message naming the field and the value.
"""

import re

import pytest

from configs_util import (EXPERIMENTS, FIXTURES, VARIANTS, check_config_builds, field_diff,
                          get_config, module_fields)
from ldm_jax import validate
from ldm_jax.convert import compvis_config
from ldm_jax.models import build

# Our config -> the original YAML describing the same network.
FIXTURE_OF = {
    "celebahq_ldm_vq4": "celebahq_vq4.yaml",
    "cin256_v2": "cin256_v2.yaml",
    "lsun_churches_ldm_kl8": "lsun_churches_kl8.yaml",
    "txt2img_laion": "txt2img_ldm_bert.yaml",
    "sr_openimages_x4": "bsr_sr.yaml",
    "inpainting_vq4": "inpainting_big.yaml",
    "layout2img": "layout2img.yaml",
    "semantic_synthesis": "semantic_synthesis.yaml",
    "sd_v1_finetune": "sd_v1_inference.yaml",
    "sd_v2_finetune": "sd_v2_v.yaml",
    "sd_v2_inpainting": "sd_v2_inpainting.yaml",
    "sd_v2_depth": "sd_v2_depth.yaml",
    "sd_x4_upscaler": "sd_x4_upscaler.yaml",
}
# Variants that describe another released network than the config's default one.
VARIANT_FIXTURES = {("sd_v2_finetune", "base"): "sd_v2_base.yaml"}
# Diffusion fields of the Stable Diffusion family's models (inpainting, depth, upscaler).
FAMILY_FIELDS = ("model_target", "concat_keys", "masked_image_key", "depth_eps", "low_scale")
DIFFUSION_FIELDS = ("timesteps", "beta_schedule", "linear_start", "linear_end", "parameterization",
                    "conditioning_key", "scale_by_std", "image_size", "channels")


# --------------------------------------------------------------------------------------------------
# Every config: loads, validates, builds, and its sections fit together.
# --------------------------------------------------------------------------------------------------

def test_the_zoo_is_complete():
  wanted = {"kl_f4", "kl_f8", "kl_f16", "kl_f32", "vq_f4", "vq_f8", "vq_f16", "celebahq_ldm_vq4",
            "ffhq_ldm_vq4", "lsun_bedrooms_ldm_vq4", "lsun_churches_ldm_kl8", "cin256_v2",
            "txt2img_laion", "sr_openimages_x4", "inpainting_vq4", "layout2img",
            "semantic_synthesis", "sd_v1_finetune", "sd_v2_finetune", "sd_v2_inpainting",
            "sd_v2_depth", "sd_x4_upscaler", "shapes_ldm_class"}
  assert wanted <= set(EXPERIMENTS), sorted(wanted - set(EXPERIMENTS))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_unknown_variant_is_refused_naming_file_and_variant(name):
  with pytest.raises(ValueError, match=rf"configs/{name}\.py.*'bogus'"):
    get_config(name, "bogus")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_variant_validates_and_builds(name):
  check_config_builds(name, "tiny")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_real_variant_validates(name):
  # Building the full-size networks is in test_configs_full.py (it takes most of a minute).
  validate.check_config(get_config(name, ""))


# --------------------------------------------------------------------------------------------------
# The paper's LDMs against the original YAMLs.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,variant,fixture",
                         [(n, "", f) for n, f in sorted(FIXTURE_OF.items())] +
                         [(n, v, f) for (n, v), f in sorted(VARIANT_FIXTURES.items())])
def test_networks_match_the_original_yaml(name, variant, fixture):
  c = get_config(name, variant)
  ref = compvis_config.load_compvis_config(FIXTURES / fixture)
  for part, builder in (("first_stage", build.build_first_stage), ("unet", build.build_unet)):
    ours = module_fields(builder(c.model[part]))
    theirs = module_fields(builder(ref[part]))
    assert ours == theirs, f"{part}: (ours, yaml) differ in {field_diff(ours, theirs)}"
  assert c.model.first_stage.kind == ref["first_stage"]["kind"]

  ref_cs = ref["cond_stage"]
  cs = c.model.get("cond_stage", None) or {"kind": "none", "kwargs": {}}
  assert cs["kind"] == ref_cs["kind"]
  if ref_cs["kind"] != "first_stage":  # 'first_stage' (inpainting) has no network of its own.
    ours_cs, theirs_cs = build.build_cond_stage(cs), build.build_cond_stage(ref_cs)
    if theirs_cs is None:
      assert ours_cs is None
    else:
      ours, theirs = module_fields(ours_cs), module_fields(theirs_cs)
      assert ours == theirs, f"cond_stage: (ours, yaml) differ in {field_diff(ours, theirs)}"
    if "tokenizer" in ref_cs:
      assert cs["tokenizer"]["kind"] == ref_cs["tokenizer"]["kind"]

  d, rd = c.model.diffusion, ref["diffusion"]
  for k in DIFFUSION_FIELDS:
    assert d[k] == rd[k], f"diffusion.{k}: ours {d[k]!r}, yaml {rd[k]!r}"
  if not rd["scale_by_std"]:
    assert d.scale_factor == rd["scale_factor"]
  assert c.train.loss_type == rd["loss_type"]
  for k in FAMILY_FIELDS:
    ours = d.get(k, None)
    ours = ours.to_dict() if hasattr(ours, "to_dict") else ours
    ours = tuple(ours) if isinstance(ours, list) else ours
    theirs = rd.get(k)
    theirs = tuple(theirs) if isinstance(theirs, list) else theirs
    if k == "model_target" and theirs == "LatentDiffusion":
      theirs = None  # Plain text-to-image: our configs leave the target out.
    assert ours == theirs, f"diffusion.{k}: ours {ours!r}, yaml {theirs!r}"


def test_unconditional_vq4_ldms_share_the_celebahq_network():
  ref = module_fields(build.build_unet(get_config("celebahq_ldm_vq4").model.unet))
  for name in ("ffhq_ldm_vq4", "lsun_bedrooms_ldm_vq4"):
    c = get_config(name)
    assert module_fields(build.build_unet(c.model.unet)) == ref
    assert c.model.first_stage.to_dict() == get_config("vq_f4").model.first_stage.to_dict()


def test_ldm_first_stages_are_the_zoo_autoencoders():
  # A stage-1 workdir of the named config must load as the LDM's first stage, tiny included.
  pairs = {"celebahq_ldm_vq4": "vq_f4", "cin256_v2": "vq_f4", "lsun_churches_ldm_kl8": "kl_f8",
           "txt2img_laion": "kl_f8", "sd_v1_finetune": "kl_f8", "sd_v2_finetune": "kl_f8",
           "sd_v2_inpainting": "kl_f8", "sd_v2_depth": "kl_f8",
           "shapes_ldm_class": "shapes_autoencoder"}
  for ldm, ae in pairs.items():
    for v in VARIANTS:
      assert get_config(ldm, v).model.first_stage.to_dict() == \
          get_config(ae, v).model.first_stage.to_dict(), (ldm, v)


# --------------------------------------------------------------------------------------------------
# Invalid configs are refused, naming the field.
# --------------------------------------------------------------------------------------------------

def _refused(c, field: str, value) -> None:
  with pytest.raises(ValueError, match=re.escape(f"config.{field}={value!r}")):
    validate.check_config(c)


def test_model_channels_not_divisible_by_groups_is_refused():
  c = get_config("celebahq_ldm_vq4", "tiny")
  c.model.unet.model_channels = 48
  _refused(c, "model.unet.model_channels", 48)


def test_heads_not_dividing_channels_are_refused():
  c = get_config("lsun_churches_ldm_kl8")
  c.model.unet.num_heads = 7  # 192 channels at level 0
  _refused(c, "model.unet.num_heads", 7)
  c = get_config("celebahq_ldm_vq4")
  c.model.unet.num_head_channels = 96  # level 0 has 224 channels
  _refused(c, "model.unet.num_head_channels", 96)


def test_image_size_not_divisible_by_the_first_stage_factor_is_refused():
  c = get_config("kl_f8")
  c.data.image_size = 260
  _refused(c, "data.image_size", 260)
  c = get_config("sd_v1_finetune")
  c.data.image_size = 516
  _refused(c, "data.image_size", 516)


def test_latent_not_divisible_by_the_unet_levels_is_refused():
  c = get_config("lsun_churches_ldm_kl8")
  c.data.image_size = 264  # latent 33: five UNet levels need a multiple of 16
  _refused(c, "model.unet.channel_mult", (1, 2, 2, 4, 4))


def test_other_impossible_fields_are_refused():
  c = get_config("vq_f8")
  c.model.first_stage.kwargs.ch = 48
  _refused(c, "model.first_stage.kwargs.ch", 48)
  c = get_config("txt2img_laion", "tiny")
  c.model.unet.context_dim = None
  _refused(c, "model.unet.context_dim", None)
  c = get_config("cin256_v2")
  c.train.cond_drop_prob = 1.0
  _refused(c, "train.cond_drop_prob", 1.0)
  c = get_config("sd_v1_finetune", "tiny")
  c.lora.rank = -2
  _refused(c, "lora.rank", -2)
  c = get_config("sd_v1_finetune", "tiny")
  c.lora.rank, c.lora.targets = 4, ("attention", "mlp")
  _refused(c, "lora.targets", ("attention", "mlp"))
  c = get_config("sd_v2_finetune")
  c.mesh.fsdp = 3  # 8 test devices
  with pytest.raises(ValueError, match=r"config\.mesh="):
    validate.check_config(c)
