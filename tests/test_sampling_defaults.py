"""Recommended sampling settings: saved with a model, used when the user gives none, and overridden
by any explicit argument, in `LatentDiffusion.sample` and in sample.py."""

import json
import os

import pytest

import cli_util
from configs import shapes_ldm_text
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling


@pytest.fixture(scope="module")
def recommending(tiny_workdirs, tmp_path_factory):
  """The tiny text LDM saved with recommendations that differ from every library default."""
  model = ldm_lib.LatentDiffusion.from_checkpoint(tiny_workdirs["ldm"])
  model.config.sampling = dict(sampler="plms", steps=3, guidance=2.5)
  path = str(tmp_path_factory.mktemp("recommending") / "model")
  model.save(path)
  return path


run_cli = cli_util.run_sample


def test_training_saves_the_configs_recommendation(tiny_workdirs):
  with open(os.path.join(tiny_workdirs["ldm"], "model", "config.json")) as f:
    saved = json.load(f)["sampling"]
  assert saved == shapes_ldm_text.get_config("tiny").model.sampling.to_dict()
  assert saved["guidance"] > 1.0  # The shapes model is trained for guidance and recommends it.


def test_settings_come_from_argument_then_model_then_defaults(recommending):
  model = ldm_lib.LatentDiffusion.from_checkpoint(recommending)
  s = model.sampling_settings()
  assert (s["sampler"], s["steps"], s["guidance"]) == ("plms", 3, 2.5)
  assert s["source"] == {"sampler": "model", "steps": "model", "guidance": "model"}
  s = model.sampling_settings(guidance=1.0, steps=7)
  assert (s["sampler"], s["steps"], s["guidance"]) == ("plms", 7, 1.0)
  assert s["source"] == {"sampler": "model", "steps": "given", "guidance": "given"}
  bare = model.config.to_dict()
  del bare["sampling"]  # A model saved before models carried recommendations.
  s = ldm_lib.LatentDiffusion(bare, model.params).sampling_settings()
  assert {k: s[k] for k in ldm_lib.SAMPLING_DEFAULTS} == ldm_lib.SAMPLING_DEFAULTS
  assert set(s["source"].values()) == {"default"}


@pytest.mark.parametrize("section, message", [
    ({"guidance": -1.0}, "model.sampling.guidance=-1.0: expected >= 0"),
    ({"sampler": "heun"}, "model.sampling.sampler='heun': expected one of"),
    ({"steps": 0}, "model.sampling.steps=0: expected 1 <= steps <= 1000"),
    ({"steps": 2.5}, "model.sampling.steps=2.5"),
    ({"scale": 3.0}, "model.sampling.scale: unknown setting"),
])
def test_bad_recommendation_is_refused_by_name(recommending, section, message):
  model = ldm_lib.LatentDiffusion.from_checkpoint(recommending)
  config = dict(model.config.to_dict(), sampling=section)
  with pytest.raises(ValueError) as e:
    ldm_lib.LatentDiffusion(config, model.params)
  assert message in str(e.value)


def test_library_sample_uses_and_prints_the_recommendation(recommending, monkeypatch, capsys):
  model = ldm_lib.LatentDiffusion.from_checkpoint(recommending)
  calls = []
  monkeypatch.setattr(sampling, "sample", lambda m, **kw: calls.append(kw))
  model.sample(prompts=["a red circle at the center"])
  assert (calls[-1]["sampler"], calls[-1]["steps"], calls[-1]["guidance"]) == ("plms", 3, 2.5)
  out = capsys.readouterr().out
  assert "sampler plms, 3 steps, guidance 2.5" in out
  assert "sampler, steps, guidance from the model's recommended settings" in out
  model.sample(prompts=["a red circle at the center"], sampler="ddim", steps=2, guidance=1.0)
  assert (calls[-1]["sampler"], calls[-1]["steps"], calls[-1]["guidance"]) == ("ddim", 2, 1.0)
  assert capsys.readouterr().out == ""  # Everything given: nothing to report.


def test_cli_with_only_a_prompt_samples_as_the_model_recommends(recommending, tmp_path, capsys):
  out = tmp_path / "rec"
  code, stdout, err = run_cli(["--checkpoint", recommending,
                               "--prompt", "a red circle at the center", "--outdir", str(out),
                               "--no_progress"], capsys)
  assert code == 0, err
  settings = json.load(open(out / "samples.json"))["settings"]
  assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("plms", 3, 2.5)
  assert "Sampling with sampler plms, 3 steps, guidance 2.5 (sampler, steps, guidance from the " \
         "model's recommended settings)" in stdout


def test_cli_flags_win_over_the_recommendation(recommending, tmp_path, capsys):
  out = tmp_path / "flags"
  code, stdout, err = run_cli(["--checkpoint", recommending,
                               "--prompt", "a red circle at the center", "--guidance", "1.0",
                               "--steps", "2", "--sampler", "euler_a", "--outdir", str(out),
                               "--no_progress"], capsys)
  assert code == 0, err
  settings = json.load(open(out / "samples.json"))["settings"]
  assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("euler_a", 2, 1.0)
  assert "Sampling with sampler euler_a, 2 steps, guidance 1" in stdout
  assert "recommended" not in stdout


def test_cli_explicit_zero_is_checked_not_taken_for_unset(recommending, tmp_path, capsys):
  """--steps 0 is the user's (bad) value, not a missing one to fill from the model."""
  code, _, err = run_cli(["--checkpoint", recommending, "--prompt", "a red circle at the center",
                          "--steps", "0", "--outdir", str(tmp_path / "bad"), "--no_progress"],
                         capsys)
  assert code == 2 and "--steps=0: expected >= 1" in err
