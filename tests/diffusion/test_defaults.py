"""The diffusion section defaults: one table that the configs and the model both fill from."""

import pytest

from configs import common
from ldm_jax import ldm as ldm_lib
from ldm_jax.diffusion import defaults


def test_configs_take_the_defaults_and_replace_only_what_they_name():
  assert common.diffusion().to_dict() == defaults.DEFAULTS
  d = common.diffusion(linear_end=0.012, conditioning_key="crossattn")
  assert d.linear_end == 0.012 and d.conditioning_key == "crossattn"
  assert d.linear_start == defaults.DEFAULTS["linear_start"] and d.cosine_s == 8e-3
  with pytest.raises(TypeError, match=r"common.diffusion\(linear_stop=...\): unknown field"):
    common.diffusion(linear_stop=0.01)


def test_the_model_fills_a_partial_section_from_the_same_table():
  section = ldm_lib.diffusion_section({"diffusion": {"timesteps": 20, "model_target": "x"}})
  assert section.timesteps == 20 and section.model_target == "x"
  assert {k: section[k] for k in defaults.DEFAULTS if k != "timesteps"} == {
      k: v for k, v in defaults.DEFAULTS.items() if k != "timesteps"}
  assert ldm_lib.diffusion_section({}).to_dict() == defaults.DEFAULTS
  # The defaults' types hold: an integer scale factor is a float field training can set.
  section = ldm_lib.diffusion_section({"diffusion": {"scale_factor": 1}})
  section.scale_factor = 0.18215
  assert section.scale_factor == 0.18215
