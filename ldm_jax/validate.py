"""Config checks run before anything is built or compiled; each error names the field and the value.

Unknown keys and wrong types are already refused by `ml_collections` (locked configs, typed fields);
this module checks what types cannot: shapes that no network can have, and choices among names.
Errors are `ldm_jax.errors.ConfigError` (a ValueError); an unusable `config.eval.reference` is an
InputError (also a ValueError) naming it.
"""

import math
import os

import jax

from ldm_jax.data import sources
from ldm_jax.data import transforms
from ldm_jax.diffusion import sampling_settings
from ldm_jax.errors import ConfigError
from ldm_jax.eval import image_sets
from ldm_jax.models import build
from ldm_jax.models import conditioning
from ldm_jax.train import classifier_task
from ldm_jax.train import lora
from ldm_jax.train.step import NONFINITE_MODES

GROUPS = 32
# config.stage: what a config trains (the command line picks the trainer by it).
STAGES = ("autoencoder", "ldm", "classifier")


def _fail(field: str, value, expected: str):
  raise ConfigError(f"config.{field}={value!r}: {expected}.")


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    _fail(field, value, f"expected one of {list(choices)}")


def check_autoencoder(prefix: str, fs, image_size: int | None) -> None:
  kw = fs.kwargs
  _check_choice(f"{prefix}.kind", fs.kind, ("kl", "vq"))
  for i, m in enumerate(kw.ch_mult):
    if (kw.ch * m) % GROUPS:
      _fail(f"{prefix}.kwargs.ch", kw.ch,
            f"level {i} has ch*ch_mult={kw.ch * m} channels, not divisible by {GROUPS} GroupNorm "
            f"groups")
  f = 2 ** (len(kw.ch_mult) - 1)
  if image_size is not None and image_size % f:
    _fail("data.image_size", image_size,
          f"must be divisible by the first stage's down-sampling factor {f}")
  if fs.kind == "vq" and not kw.get("n_embed"):
    _fail(f"{prefix}.kwargs.n_embed", kw.get("n_embed"), "a VQ first stage needs a codebook size")


def check_unet(prefix: str, unet, latent_size: int | None) -> None:
  mc = unet.model_channels
  levels = len(unet.channel_mult)
  for i, m in enumerate(unet.channel_mult):
    ch = mc * m
    if ch % GROUPS:
      _fail(f"{prefix}.model_channels", mc,
            f"level {i} has {ch} channels, not divisible by {GROUPS} GroupNorm groups")
    ds = 2 ** i
    if ds in tuple(unet.attention_resolutions):
      head_ch = unet.get("num_head_channels", -1)
      heads = unet.get("num_heads", -1)
      if head_ch not in (-1, None) and ch % head_ch:
        _fail(f"{prefix}.num_head_channels", head_ch, f"must divide the {ch} channels of level {i}")
      if (head_ch in (-1, None)) and (heads in (-1, None) or heads <= 0 or ch % heads):
        _fail(f"{prefix}.num_heads", heads,
              f"must be positive and divide the {ch} channels of level {i}")
  if unet.get("use_spatial_transformer") and not unet.get("context_dim"):
    _fail(f"{prefix}.context_dim", unet.get("context_dim"),
          "a spatial transformer needs the conditioning width")
  if latent_size is not None and latent_size % (2 ** (levels - 1)):
    _fail(f"{prefix}.channel_mult", tuple(unet.channel_mult),
          f"{levels} levels halve the latent {levels - 1} times, but the latent size "
          f"{latent_size} is not divisible by {2 ** (levels - 1)}")


def check_mesh(mesh, num_devices: int | None = None) -> None:
  """num_devices: the devices the run will use (default: this process's JAX, all hosts)."""
  sizes = {k: mesh.get(k, 1) for k in ("data", "fsdp", "tensor")}
  n = jax.device_count() if num_devices is None else int(num_devices)
  limit = int(mesh.get("num_devices", 0))
  if limit:
    if limit < 0 or limit > n:
      _fail("mesh.num_devices", limit, f"expected 0 (all) or 1..{n} (the available devices)")
    if jax.process_count() > 1:
      _fail("mesh.num_devices", limit, "a multi-host run must use every device (0)")
    n = limit
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    _fail("mesh", sizes, "at most one axis may be -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    _fail("mesh", sizes, "axis sizes must be positive or -1")
  if (free and n % fixed) or (not free and fixed != n):
    _fail("mesh", sizes, f"the axes must multiply to the {n} devices in use")


def check_eval_config(config) -> None:
  """ValueError naming the first impossible `config.eval` field (only when every_steps > 0)."""
  ev = config.get("eval")
  if ev is None or not ev.every_steps:
    return

  def fail(field, expected):
    raise ConfigError(f"config.eval.{field}={ev[field]!r}: {expected}.")

  if ev.every_steps < 0:
    fail("every_steps", "expected >= 0 (0 disables the evaluation)")
  for field in ("num_samples", "batch_size", "inception_batch", "is_splits"):
    if ev[field] < 1:
      fail(field, "expected >= 1")
  sampling_settings.check({k: ev[k] for k in ("sampler", "steps", "eta", "guidance", "seed")},
                          prefix="config.eval.", timesteps=int(config.model.diffusion.timesteps),
                          num_samples=ev.num_samples, error=ConfigError)
  if ev.pr_k < 0:
    fail("pr_k", "expected >= 0")
  if not os.path.isfile(ev.inception):
    fail("inception", "expected the FID Inception weights file (from python -m "
                      "ldm_jax.convert.inception)")
  if ev.reference:
    image_sets.reference_kind(ev.reference, "config.eval.reference")  # An InputError.
  kind = (config.model.get("cond_stage") or {}).get("kind", "none")
  if kind not in ("none", "class") and kind not in build.TEXT_ENCODERS:
    fail("every_steps", f"sample-and-evaluate needs an unconditional, class or text model; "
                        f"this one is conditioned by {kind!r}")


def _check_tfds_annotation_keys(data, needs: sources.Annotations) -> None:
  """A TFDS source names the features that hold what the model's condition reads."""
  keys = []
  if needs.max_boxes:
    keys += [("boxes_key", "a BBoxFeature sequence such as 'objects/bbox'"),
             ("box_labels_key", "the boxes' classes such as 'objects/label'")]
  if needs.maps:
    keys.append(("segmentation_key", "an image feature of class indices such as 'annotation'"))
  for key, what in keys:
    if not data.get(key):
      _fail(f"data.{key}", data.get(key, ""), f"this model reads it from the TFDS dataset; "
                                              f"expected {what}")


def check_config(config, num_devices: int | None = None) -> None:
  """Raises ValueError naming the first impossible field of an experiment config.

  num_devices: the devices the mesh must cover (default: `jax.device_count()`); ahead-of-time
  compilation checks against the target topology's.
  """
  _check_choice("stage", config.stage, STAGES)
  _check_choice("data.source", config.data.source, sources.NAMES)
  if config.data.batch_size < 1:
    _fail("data.batch_size", config.data.batch_size, "expected >= 1")
  if config.train.num_steps < 0:
    _fail("train.num_steps", config.train.num_steps, "expected >= 0")
  _check_choice("train.compute_dtype", config.train.compute_dtype, ("float32", "bfloat16"))
  _check_choice("train.nonfinite", config.train.nonfinite, NONFINITE_MODES)
  if not 0.0 <= config.train.cond_drop_prob < 1.0:
    _fail("train.cond_drop_prob", config.train.cond_drop_prob, "expected in [0, 1)")
  check_mesh(config.mesh, num_devices)
  if lora.enabled(config):
    lora.check_config(config)
  model = config.model
  check_autoencoder("model.first_stage", model.first_stage, config.data.image_size)
  if config.stage == "classifier":
    _check_choice("model.diffusion.beta_schedule", model.diffusion.beta_schedule,
                  ("linear", "sqrt_linear", "sqrt", "cosine"))
    try:
      classifier_task.check_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return
  if config.stage == "ldm":
    f = 2 ** (len(model.first_stage.kwargs.ch_mult) - 1)
    check_unet("model.unet", model.unet, config.data.image_size // f)
    _check_choice("model.diffusion.parameterization", model.diffusion.parameterization,
                  ("eps", "x0", "v"))
    _check_choice("model.diffusion.conditioning_key", model.diffusion.conditioning_key,
                  conditioning.CONDITIONING_KEYS)
    _check_choice("model.diffusion.beta_schedule", model.diffusion.beta_schedule,
                  ("linear", "sqrt_linear", "sqrt", "cosine"))
    _check_choice("data.degradation", config.data.get("degradation", transforms.BICUBIC),
                  transforms.DEGRADATIONS)
    try:
      needs = sources.annotations_for(model)  # A layout model's box coding must fit its transformer.
    except ValueError as e:
      raise ConfigError(f"config.{e}.") from None
    if config.data.source == "tfds":
      _check_tfds_annotation_keys(config.data, needs)
    if model.unet.in_channels < model.first_stage.kwargs.embed_dim:
      _fail("model.unet.in_channels", model.unet.in_channels,
            f"must be at least the latent channels {model.first_stage.kwargs.embed_dim}")
    check_eval_config(config)
  else:
    _check_choice("loss.kind", config.loss.kind, ("kl", "vq"))
    _check_choice("loss.disc_loss", config.loss.disc_loss, ("hinge", "vanilla"))
