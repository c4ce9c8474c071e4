"""One check of the sampler settings: its rules, and the four places that take settings from a user
(sample.py, `evaluate.py samples`, the training config's `config.eval`, a saved model's
`model.sampling`) refusing the same bad value with the same explanation under their own names."""

import math
import types

import ml_collections
import pytest

from configs import shapes_ldm_text
from ldm_jax import ldm as ldm_lib
from ldm_jax import validate
from ldm_jax.cli import sample as sample_cli
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import ConfigError, InputError
from ldm_jax.eval import sample_eval

T = 1000  # The tiny shapes model's timesteps, which every caller below checks against.


def _sample_py(settings):
  args = sample_cli.parse_args(["--checkpoint", "m", "--prompt", "x", "--outdir", "o"])
  for name, value in settings.items():
    setattr(args, name, value)
  sample_cli.check_sampling(args, T)  # As `run` checks once the model is loaded.
  sample_cli.check_arguments(args)    # The seed, with the flags that need no model.


def _evaluate_samples(settings):
  # What check_settings reads of a text model.
  model = types.SimpleNamespace(config=ml_collections.ConfigDict({"diffusion": {"timesteps": T}}),
                                cond_kind="ldm_bert", is_text=True)
  s = sample_eval.SampleSettings(**dict({"num_samples": 1, "prompts": ("x",)}, **settings))
  sample_eval.check_settings(s, model, prefix="--")


def _train_config(settings):
  config = shapes_ldm_text.get_config("tiny")
  assert config.model.diffusion.timesteps == T
  # Any existing file passes the config check of the Inception weights (they are read later).
  config.eval.update(dict({"every_steps": 1, "num_samples": 1, "inception": __file__}, **settings))
  validate.check_eval_config(config)


def _saved_model(settings):
  ldm_lib.check_sampling_config(settings, T)


CALLERS = {
    "sample.py": (_sample_py, "--", InputError),
    "evaluate.py samples": (_evaluate_samples, "--", InputError),
    "config.eval": (_train_config, "config.eval.", ConfigError),
    "model.sampling": (_saved_model, "model.sampling.", ConfigError),
}
EVERYWHERE = tuple(CALLERS)
NOT_SAVED = ("sample.py", "evaluate.py samples", "config.eval")  # A model recommends no eta/seed.


@pytest.mark.parametrize("settings, message, callers", [
    ({"sampler": "heun"}, f"<>sampler='heun': expected one of {list(samplers.NAMES)}.",
     EVERYWHERE),
    ({"steps": 0}, f"<>steps=0: expected 1 <= steps <= {T}.", EVERYWHERE),
    ({"steps": T + 1}, f"<>steps={T + 1}: expected 1 <= steps <= {T}.", EVERYWHERE),
    ({"guidance": -1.0}, "<>guidance=-1.0: expected >= 0.", EVERYWHERE),
    ({"guidance": math.nan}, "<>guidance=nan: expected a finite number >= 0.", EVERYWHERE),
    ({"eta": -0.5}, "<>eta=-0.5: expected >= 0 (0 = deterministic DDIM).", NOT_SAVED),
    ({"sampler": "euler_a", "eta": 0.5}, "<>eta=0.5 with <>sampler=euler_a: eta is a DDIM "
     "setting; expected <>eta=0 or <>sampler=ddim.", NOT_SAVED),
    ({"seed": -1}, "<>seed=-1: expected 0 <= seed <= 4294967295 (sample i of 1 uses seed + i; "
     "seeds are below 2**32).", NOT_SAVED),
])
def test_every_caller_refuses_a_bad_setting_alike(settings, message, callers):
  for caller in callers:
    check, prefix, error = CALLERS[caller]
    with pytest.raises(error) as e:
      check(settings)
    assert str(e.value) == message.replace("<>", prefix), caller


def test_good_settings_pass_every_caller():
  # The other half of the test above: the callers refuse the bad value, not everything.
  for caller in EVERYWHERE:
    CALLERS[caller][0]({"sampler": "euler_a", "steps": T, "guidance": 0.0})
  for caller in NOT_SAVED:
    CALLERS[caller][0]({"sampler": "ddim", "eta": 1.0, "seed": 2 ** 32 - 1})


def test_saved_model_takes_only_what_it_can_recommend():
  with pytest.raises(ConfigError, match=r"model.sampling.eta: unknown setting; expected only "
                                        r"\['guidance', 'sampler', 'steps'\]"):
    ldm_lib.check_sampling_config({"eta": 0.0}, T)


@pytest.mark.parametrize("settings, kwargs, message", [
    # Before the model is loaded only the lower bound of steps is known.
    ({"steps": 0}, {}, "--steps=0: expected >= 1."),
    ({"steps": 10 ** 6}, {}, None),
    ({"steps": 2.5}, {"timesteps": 10}, "--steps=2.5: expected an integer, 1 <= steps <= 10."),
    ({"steps": True}, {}, "--steps=True: expected an integer, 1 <= steps."),
    ({"sampler": None, "steps": None, "eta": 0.5}, {}, None),  # Not chosen yet: not checked.
    ({"eta": 0.5, "sampler": "ddim"}, {}, None),
    ({"guidance": math.inf}, {}, "--guidance=inf: expected a finite number >= 0."),
    ({"guidance_rescale": 1.5}, {}, "--guidance_rescale=1.5: expected 0 <= rescale <= 1."),
    ({"strength": 0.0}, {}, "--strength=0.0: expected 0 < strength <= 1."),
    ({"strength": 0.1, "steps": 5}, {}, "--strength=0.1 with --steps=5 runs no denoising step: "
     "expected --strength >= 0.2 (1 / steps), or more --steps."),
    ({"strength": 0.2, "steps": 5}, {}, None),
    ({"seed": 2 ** 32 - 2}, {"num_samples": 3},
     "--seed=4294967294: expected 0 <= seed <= 4294967293 (sample i of 3 uses seed + i; seeds "
     "are below 2**32)."),
    ({"seed": 2 ** 32 - 3}, {"num_samples": 3}, None),
    ({"scale": 3.0}, {}, "--scale: unknown setting; expected only"),
])
def test_rules(settings, kwargs, message):
  if message is None:
    sampling_settings.check(settings, prefix="--", **kwargs)
    return
  with pytest.raises(InputError) as e:
    sampling_settings.check(settings, prefix="--", **kwargs)
  assert str(e.value).startswith(message), str(e.value)
