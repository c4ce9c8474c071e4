"""Sample-and-evaluate during stage-2 training (`config.eval`, see configs/common.py).

`validate.check_eval_config` rejects impossible settings before compiling; `make_train_hook`
returns `run(model, step)`, which samples with the model being trained, computes FID / IS /
precision-recall with the evaluation library (ldm_jax/eval/) and returns `eval/...` scalars for the
metric writer.
"""

import dataclasses
from typing import Any, Callable, Iterable, Iterator

from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.eval import image_sets
from ldm_jax.eval import sample_eval


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


def make_train_hook(config, workdir: str, mesh=None) -> Callable[..., dict[str, float]]:
  """`run(model, step, check) -> {'eval/fid': ...}`: samples and evaluates the model being trained.

  mesh: the training mesh; its batch axes split every sampler batch.

  `check()` runs between images (sampled, or reference images being featurised) and raises to
  abandon the evaluation, e.g. `PreemptionGuard.check` on SIGTERM.

  The Inception is loaded now, the reference statistics at the first call (then kept); every call
  also writes `<workdir>/eval/step_NNNNNNN.json`. Unusable Inception weights raise InputError
  naming config.eval.inception.
  """
  ev = config.eval
  prompts = tuple(ev.prompts) or tuple(config.log.sample_prompts) or ("",)
  settings = sample_eval.SampleSettings(
      num_samples=ev.num_samples, sampler=ev.sampler, steps=ev.steps, eta=ev.eta,
      guidance=ev.guidance, seed=ev.seed, batch_size=ev.batch_size, prompts=prompts)
  extractor = image_sets.load_extractor(ev.inception, ev.inception_batch,
                                        int(config.mesh.get("num_devices", 0)),
                                        field="config.eval.inception",
                                        devices_field="config.mesh.num_devices")
  cache: dict[str, image_sets.Reference] = {}

  def run(model, step: int, check: Callable[[], None] = lambda: None) -> dict[str, float]:
    checked_extractor = _CheckedExtractor(extractor, check)
    if ev.reference and "ref" not in cache:
      cache["ref"] = image_sets.load_reference(
          ev.reference, checked_extractor, need_features=ev.pr_k > 0,
          max_images=ev.max_reference_images, image_size=ev.reference_size, data_dir=ev.data_dir,
          cache_dir=ev.cache_dir, show_progress=False, field="config.eval.reference")
    s = dataclasses.replace(settings, prompts=settings.prompts if model.is_text else ())
    # The steps of sample_eval.evaluate_model, with `check` between images, so a preemption
    # stops the phase within one sample (or Inception) batch.
    features = checked_extractor(sample_eval.generate(model, s, show_progress=False, mesh=mesh),
                                 outputs=("pool", "logits_unbiased"))
    metrics = image_sets.set_metrics(features, cache.get("ref"), is_splits=ev.is_splits,
                                     pr_k=ev.pr_k)
    if parallel.is_main_process():
      image_sets.write_result(layout.eval_result_path(workdir, step),
                              {"mode": "train_hook", "step": step, "metrics": metrics,
                               "settings": ev.to_dict()})
    return {f"eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, float) and k != "num_reference"}

  return run
