"""The sampler settings a user picks (sampler, steps, eta, guidance, ...) and the one check of them.

    sampling_settings.check({"sampler": "plms", "eta": 0.5}, prefix="--", timesteps=1000)
    -> InputError: --eta=0.5 with --sampler=plms: eta is a DDIM setting; expected --eta=0 or ...

Four places take these settings from a user and all call `check`: sample.py's flags (`--steps`),
`evaluate.py samples` (`--steps`), the training config's `config.eval` section
(`config.eval.steps`) and a saved model's recommended settings (`model.sampling.steps`). Each
passes the prefix its user knows the settings by, so the same bad value gets the same explanation
under that caller's field name. The names of the samplers come from `samplers.NAMES`.
"""

import math
import numbers
from typing import Any, Iterable, Mapping

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import samplers_base
from ldm_jax.errors import InputError, UserError

# What a model with no recommended settings of its own (config section `sampling`) is sampled
# with. Guidance 1.0 is no classifier-free guidance: the only safe choice for a model that may have
# been trained without condition dropout.
DEFAULTS: dict[str, Any] = {"sampler": "ddim", "steps": 50, "guidance": 1.0}
# The settings a saved model may recommend (its config's `sampling` section).
RECOMMENDABLE = tuple(DEFAULTS)
# jax.random.PRNGKey folds seeds modulo 2**32 (2**32 gives the same noise as 0) and cannot take
# 2**63 or more: seeds outside [0, 2**32) would silently repeat or crash.
SEED_LIMIT = 2 ** 32
# Every setting `check` knows. `eta` is DDIM's noise scale, `guidance_rescale` the rescale of
# guided predictions, `strength` img2img's share of the schedule, `seed` the first sample's seed.
SETTINGS = ("sampler", "steps", "eta", "guidance", "guidance_rescale", "strength", "seed")


def _shown(value: Any) -> str:
  """A value as the messages print it: numbers plainly (numpy scalars too), strings quoted."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return str(int(value))
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return repr(float(value))
  return repr(value)


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def _is_integer(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check(settings: Mapping[str, Any], *, prefix: str, timesteps: int | None = None,
          num_samples: int = 1, allowed: Iterable[str] = SETTINGS,
          error: type[UserError] = InputError) -> None:
  """Raises `error` naming the first impossible setting of `settings` as `prefix` + its name.

  settings: any of SETTINGS; a setting that is absent or None is not chosen yet and not checked
    (sample.py checks its flags before the model fills in the ones left out, then again after).
  prefix: how the caller's user spells the settings: '--', 'config.eval.', 'model.sampling.'.
  timesteps: the model's T, the most steps a sampler can take (None: not known yet).
  num_samples: how many samples use seeds seed, seed + 1, ...
  allowed: the settings this caller takes; any other key is refused by name.
  error: InputError for arguments, ConfigError for configs and saved models.
  """
  allowed = tuple(allowed)
  unknown = sorted(set(settings) - set(allowed))
  if unknown:
    raise error(f"{prefix}{unknown[0]}: unknown setting; expected only {sorted(allowed)}.")
  given = {k: v for k, v in settings.items() if v is not None}

  def fail(name: str, expected: str):
    raise error(f"{prefix}{name}={_shown(given[name])}: {expected}.")

  sampler = given.get("sampler")
  if "sampler" in given and (not isinstance(sampler, str) or sampler not in samplers.NAMES):
    fail("sampler", f"expected one of {list(samplers.NAMES)}")
  steps = given.get("steps")
  if "steps" in given:
    # Without the model's T only the lower bound is known.
    bounds = "1 <= steps" + ("" if timesteps is None else f" <= {timesteps}")
    if not _is_integer(steps):
      fail("steps", f"expected an integer, {bounds}")
    if steps < 1 or (timesteps is not None and steps > timesteps):
      fail("steps", "expected >= 1" if timesteps is None else f"expected {bounds}")
  for name, meaning in (("eta", " (0 = deterministic DDIM)"), ("guidance", "")):
    if name in given:
      if not _is_number(given[name]):
        fail(name, "expected a finite number >= 0")
      if given[name] < 0:
        fail(name, f"expected >= 0{meaning}")
  if given.get("eta", 0) != 0 and sampler is not None and samplers.resolve(sampler) != "ddim":
    raise error(f"{prefix}eta={_shown(given['eta'])} with {prefix}sampler={sampler}: eta is a "
                f"DDIM setting; expected {prefix}eta=0 or {prefix}sampler=ddim.")
  if "guidance_rescale" in given:
    rescale = given["guidance_rescale"]
    if not _is_number(rescale) or not 0.0 <= rescale <= 1.0:
      fail("guidance_rescale", "expected 0 <= rescale <= 1")
  if "strength" in given:
    strength = given["strength"]
    if not _is_number(strength) or not 0.0 < strength <= 1.0:
      fail("strength", "expected 0 < strength <= 1")
    if steps is not None:
      try:
        samplers_base.img2img_skip(steps, float(strength))
      except ValueError:
        raise error(f"{prefix}strength={_shown(strength)} with {prefix}steps={steps} runs no "
                    f"denoising step: expected {prefix}strength >= {1.0 / steps:.4g} (1 / steps), "
                    f"or more {prefix}steps.") from None
  if "seed" in given:
    last = SEED_LIMIT - num_samples
    if not _is_integer(given["seed"]) or not 0 <= given["seed"] <= last:
      fail("seed", f"expected 0 <= seed <= {last} (sample i of {num_samples} uses seed + i; "
                   f"seeds are below 2**32)")
