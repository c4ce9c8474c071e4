"""Sample-and-evaluate during stage-2 training (`config.eval`, see configs/common.py).

`check_eval_config` rejects impossible settings before compiling; `make_train_hook` returns
`run(model, step)`, which samples with the model being trained, computes FID / IS /
precision-recall through ldm_jax.evaluate and returns `eval/...` scalars for the metric writer.
"""

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

from ldm_jax import evaluate
from ldm_jax.diffusion import samplers


def check_eval_config(config) -> None:
  """ValueError naming the first impossible `config.eval` field (only when every_steps > 0)."""
  from ldm_jax.models import build
  ev = config.get("eval")
  if ev is None or not ev.every_steps:
    return

  def fail(field, expected):
    raise ValueError(f"config.eval.{field}={ev[field]!r}: {expected}.")

  if ev.every_steps < 0:
    fail("every_steps", "expected >= 0 (0 disables the evaluation)")
  for field in ("num_samples", "steps", "batch_size", "inception_batch", "is_splits"):
    if ev[field] < 1:
      fail(field, "expected >= 1")
  if ev.sampler not in samplers.NAMES:
    fail("sampler", f"expected one of {list(samplers.NAMES)}")
  if ev.steps > config.model.diffusion.timesteps:
    fail("steps", f"expected <= model.diffusion.timesteps = {config.model.diffusion.timesteps}")
  if ev.guidance < 0 or ev.pr_k < 0:
    fail("guidance" if ev.guidance < 0 else "pr_k", "expected >= 0")
  if not os.path.isfile(ev.inception):
    fail("inception", "expected the FID Inception weights file (from python -m "
                      "ldm_jax.convert.inception)")
  if ev.reference:
    try:
      evaluate.reference_kind(ev.reference, "config.eval.reference")
    except evaluate.UserError as e:
      raise ValueError(str(e)) from None
  kind = (config.model.get("cond_stage") or {}).get("kind", "none")
  if kind not in ("none", "class") and kind not in build.TEXT_ENCODERS:
    fail("every_steps", f"sample-and-evaluate needs an unconditional, class or text model; "
                        f"this one is conditioned by {kind!r}")


def _checked(images: Iterable[Any], check: Callable[[], None]) -> Iterator[Any]:
  """`images`, calling `check` (which raises to abandon the phase) before each one."""
  for image in images:
    check()
    yield image


class _CheckedExtractor:
  """The Inception extractor, calling `check` before each image it is given (other attributes,
  such as the weights' fingerprint that keys the reference cache, are the extractor's own)."""

  def __init__(self, extractor, check: Callable[[], None]):
    self._extractor, self._check = extractor, check

  def __call__(self, images: Iterable[Any], **kwargs):
    return self._extractor(_checked(images, self._check), **kwargs)

  def __getattr__(self, name: str):
    return getattr(self._extractor, name)


def make_train_hook(config, workdir: str) -> Callable[..., dict[str, float]]:
  """`run(model, step, check) -> {'eval/fid': ...}`: samples and evaluates the model being trained.

  `check()` runs between images (sampled, or reference images being featurised) and raises to
  abandon the evaluation, e.g. `PreemptionGuard.check` on SIGTERM.

  The Inception is loaded now, the reference statistics at the first call (then kept); every call
  also writes `<workdir>/eval/step_NNNNNNN.json`.
  """
  from ldm_jax import parallel
  ev = config.eval
  prompts = tuple(ev.prompts) or tuple(config.log.sample_prompts) or ("",)
  settings = evaluate.SampleSettings(num_samples=ev.num_samples, sampler=ev.sampler, steps=ev.steps,
                            eta=ev.eta, guidance=ev.guidance, seed=ev.seed,
                            batch_size=ev.batch_size, prompts=prompts)
  try:
    extractor = evaluate.load_extractor(ev.inception, ev.inception_batch,
                               int(config.mesh.get("num_devices", 0)))
  except evaluate.UserError as e:
    raise FileNotFoundError(str(e).replace("--inception", "config.eval.inception")) from None
  cache: dict[str, evaluate.Reference] = {}

  def run(model, step: int, check: Callable[[], None] = lambda: None) -> dict[str, float]:
    checked_extractor = _CheckedExtractor(extractor, check)
    if ev.reference and "ref" not in cache:
      cache["ref"] = evaluate.load_reference(
          ev.reference, checked_extractor, need_features=ev.pr_k > 0,
          max_images=ev.max_reference_images, image_size=ev.reference_size, data_dir=ev.data_dir,
          cache_dir=ev.cache_dir, show_progress=False)
    s = dataclasses.replace(settings, prompts=settings.prompts if model.is_text else ())
    # The steps of evaluate.evaluate_model, with `check` between images, so a preemption stops
    # the phase within one sample (or Inception) batch.
    features = checked_extractor(evaluate.generate(model, s, show_progress=False),
                                 outputs=("pool", "logits_unbiased"))
    metrics = evaluate.set_metrics(features, cache.get("ref"), is_splits=ev.is_splits,
                                   pr_k=ev.pr_k)
    if parallel.is_main_process():
      evaluate.write_result(os.path.join(workdir, "eval", f"step_{step:07d}.json"),
                   {"mode": "train_hook", "step": step, "metrics": metrics,
                    "settings": ev.to_dict()})
    return {f"eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, float) and k != "num_reference"}

  return run
