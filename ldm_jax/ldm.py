"""`LatentDiffusion`: the object users hold — config + params of first stage, UNet and condition encoder.

    ldm = LatentDiffusion.from_checkpoint("workdirs/shapes_ldm")      # or from_compvis / from_diffusers
    images = ldm.sample(prompts=["a red circle at the top left"], steps=50, guidance=3.0, seed=0)

Everything heavy is a jitted pure function of explicit parameters; this class only holds the modules,
the parameters and the tokenizer, and caches compiled functions per input shape.
"""

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import errors
from ldm_jax import family
from ldm_jax import model_io
from ldm_jax import sampling
from ldm_jax.convert import pipeline
from ldm_jax.data import shapes as shapes_lib
# `sample` returns floats in [-1, 1]; users convert them with `ldm_jax.ldm.to_uint8`.
from ldm_jax.data.transforms import to_uint8  # pylint: disable=unused-import
from ldm_jax.diffusion import sampling_settings
from ldm_jax.diffusion import schedules as schedules_lib
from ldm_jax.models import build
from ldm_jax.models import conditioning as conditioning_lib
from ldm_jax.models import tokenizers as tokenizers_lib
from ldm_jax.models import word_tokenizer
# The networks' pure functions live in networks.py, beneath the sampler and the loader; they are
# re-exported here because `ldm.Conditioning`, `ldm.init_params`, ... are how callers name them.
# pylint: disable-next=unused-import
from ldm_jax.networks import (Conditioning, cond_stage_fn, decode_fn, denoise_fn, encode_fn,
                              diffusion_section, example_conditioning, init_params,
                              noise_schedule)

WORD_TOKENIZERS = ("shapes", "wordlevel")
# What a model without recommended sampling settings (config section `sampling`) is sampled with.
SAMPLING_DEFAULTS = sampling_settings.DEFAULTS


class LatentDiffusion:
  """A latent diffusion model: first stage, UNet, condition encoder, noise schedule."""

  def __init__(self, config: Mapping[str, Any], params: Mapping[str, Any], *,
               compute_dtype: str = "float32", tokenizer=None, tokenizer_path: str | None = None):
    """Args:
      config: the model config (first_stage, unet, cond_stage, diffusion; see models/build.py).
      params: {'first_stage': variables, 'unet': variables, 'cond_stage': variables or {}}.
      compute_dtype: 'float32' or 'bfloat16' (parameters stay as given).
      tokenizer / tokenizer_path: for text models; by default the config's cond_stage.tokenizer.path.
    """
    # A private, unlocked copy: trainers adjust fields (remat, scale_factor) on their own model.
    config = ml_collections.ConfigDict(
        config.to_dict() if hasattr(config, "to_dict") else dict(config))
    diffusion = config.diffusion = diffusion_section(config)
    conditioning_lib.check_conditioning_key(diffusion.conditioning_key)
    check_sampling_config(config.get("sampling", {}), int(diffusion.timesteps))
    self.config = config
    self.params = dict(params)
    self.compute_dtype = compute_dtype
    self.first_stage = build.build_first_stage(config.first_stage, compute_dtype)
    self.unet = build.build_unet(config.unet, compute_dtype)
    self.cond_stage_config = dict(config.get("cond_stage", {}) or {"kind": "none"})
    self.cond_stage = build.build_cond_stage(self.cond_stage_config, compute_dtype)
    self.schedule = noise_schedule(config)
    self._tokenizer = tokenizer
    self._tokenizer_path = tokenizer_path
    self._compiled: dict[Any, Any] = {}

  # ----------------------------------------------------------------------------------------------
  # Properties.
  # ----------------------------------------------------------------------------------------------
  @property
  def cond_kind(self) -> str:
    return self.cond_stage_config.get("kind", "none")

  @property
  def scale_factor(self) -> float:
    return float(self.config.diffusion.scale_factor)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.config.first_stage.kwargs.ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.config.first_stage.kwargs.embed_dim)

  @property
  def is_text(self) -> bool:
    return self.cond_kind in build.TEXT_ENCODERS

  @property
  def is_text_inpainting(self) -> bool:
    """A Stable Diffusion inpainting model: text by cross-attention, [mask, masked latent]."""
    return self.config.diffusion.get("model_target") == family.INPAINT_TARGET

  @property
  def is_upscaler(self) -> bool:
    return self.config.diffusion.get("model_target") == family.UPSCALE_TARGET

  @property
  def is_depth(self) -> bool:
    return self.config.diffusion.get("model_target") == family.DEPTH_TARGET

  @property
  def null_label(self) -> int:
    """The class label that stands for 'no class' (classifier-free guidance) in a class model."""
    return conditioning_lib.null_label(
        int(self.cond_stage_config.get("kwargs", {}).get("n_classes", 1)))

  @property
  def max_noise_level(self) -> int:
    return int(self.config.diffusion.low_scale.max_noise_level)

  @functools.cached_property
  def low_scale_schedule(self) -> schedules_lib.Schedule:
    """The upscaler's image-space noise schedule for its low-resolution input."""
    ls = self.config.diffusion.low_scale
    return schedules_lib.Schedule.create(ls.beta_schedule, int(ls.timesteps),
                                         linear_start=ls.linear_start, linear_end=ls.linear_end)

  @property
  def is_inpainting(self) -> bool:
    """A model that inpaints from its condition (needs an init image and a mask), text or not."""
    return self.cond_kind == "first_stage" or self.is_text_inpainting

  @property
  def tokenizer(self):
    if self._tokenizer is None and self.is_text:
      tok_cfg = dict(self.cond_stage_config.get("tokenizer", {}))
      path = self._tokenizer_path or tok_cfg.get("path")
      if tok_cfg.get("kind") in WORD_TOKENIZERS:
        self._tokenizer = word_tokenizer.load_word_tokenizer(path or "",
                                                             shapes_lib.caption_words())
        return self._tokenizer
      if not path:
        raise ValueError("model.cond_stage.tokenizer.path is empty: a text model needs a local "
                         "tokenizer directory (nothing is downloaded).")
      self._tokenizer = tokenizers_lib.load_tokenizer(tok_cfg.get("kind", self.cond_kind), path)
    return self._tokenizer

  def sampling_settings(self, *, sampler: str | None = None, steps: int | None = None,
                        guidance: float | None = None) -> dict[str, Any]:
    """The sampler, steps and guidance scale to sample with, each from the first place that has it:
    the argument, the model's recommendation (config section `sampling`), SAMPLING_DEFAULTS.

    Returns {'sampler', 'steps', 'guidance', 'source': {name: 'given' | 'model' | 'default'}}.
    """
    recommended = dict(self.config.get("sampling", {}) or {})
    out: dict[str, Any] = {"source": {}}
    for name, given in (("sampler", sampler), ("steps", steps), ("guidance", guidance)):
      if given is not None:
        out[name], out["source"][name] = given, "given"
      elif name in recommended:
        out[name], out["source"][name] = recommended[name], "model"
      else:
        out[name], out["source"][name] = SAMPLING_DEFAULTS[name], "default"
    out["steps"], out["guidance"] = int(out["steps"]), float(out["guidance"])
    return out

  # ----------------------------------------------------------------------------------------------
  # First stage.
  # ----------------------------------------------------------------------------------------------
  def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, C] (posterior sample when rng given)."""
    return encode_fn(self.first_stage, self.params["first_stage"], jnp.asarray(images), rng,
                     self.scale_factor)

  def decode(self, latents: jax.Array, *, tile: int | None = None, overlap: int = 8) -> jax.Array:
    """Scaled latents -> images [B, H, W, 3] in (about) [-1, 1].

    tile: decode in overlapping tiles of tile x tile latents (blended), so memory is bounded by the
      tile rather than the image: for larger-than-trained samples.
    """
    latents = jnp.asarray(latents)
    if tile is None or max(latents.shape[1:3]) <= tile:
      return decode_fn(self.first_stage, self.params["first_stage"], latents, self.scale_factor)
    from ldm_jax.diffusion import tiling  # Local: only big images need it.
    decode_one = functools.partial(decode_fn, self.first_stage)
    return tiling.tiled_decode(
        lambda z, aux: decode_one(aux, z, self.scale_factor), latents, tile=tile,
        overlap=min(overlap, tile - 1), scale=self.downsample_factor,
        aux=self.params["first_stage"])

  # ----------------------------------------------------------------------------------------------
  # Conditioning.
  # ----------------------------------------------------------------------------------------------
  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    max_length = int(self.cond_stage_config.get("kwargs", {}).get("max_length", 77))
    if self.cond_stage_config.get("tokenizer", {}).get("kind") in WORD_TOKENIZERS:
      return word_tokenizer.word_tokenize(self.tokenizer, list(prompts), max_length)
    return tokenizers_lib.tokenize(self.tokenizer, list(prompts), max_length=max_length)

  def condition(self, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                images: jax.Array | None = None, mask: jax.Array | None = None,
                tokens: jax.Array | None = None, noise_level: int | None = None,
                lowres_noise: jax.Array | None = None,
                depth: jax.Array | None = None) -> Conditioning:
    """Encodes prompts (text models), labels (class models) or images (concat models).

    Inpainting models take the masked image (zero in the hole) as `images` and the pixel mask
    [B, H, W, 1] (1 = keep) as `mask`. The paper's (cond kind 'first_stage') get what its
    inpainting script builds: [encode(masked image with the hole black, -1), hole mask as -1 / +1]
    at latent resolution, that order; Stable Diffusion's see `inpaint_concat`.
    The x4 upscaler takes the low-resolution image as `images`, `noise_level` and the image-space
    noise `lowres_noise` (same shape as images; see `augment_lowres`). Depth-to-image models take
    `depth`, the map already at latent size (`depth_condition`).
    """
    kind = self.cond_kind
    if tokens is not None:  # Pre-tokenised input, e.g. layout box tokens.
      if self.cond_stage is None or not self.is_text:
        raise ValueError(f"tokens were given but this model is conditioned by {kind!r}.")
      return Conditioning(context=cond_stage_fn(self.cond_stage, self.params["cond_stage"],
                                                jnp.asarray(tokens, jnp.int32)))
    if kind == "first_stage":
      if images is None or mask is None:
        raise ValueError("this is an inpainting model: give the image and the mask.")
      keep = jnp.asarray(mask, jnp.float32)
      # The script maps (1 - mask) * image from [0, 1] to [-1, 1]: the hole becomes -1, not 0.
      c = self.encode(jnp.asarray(images) - (1.0 - keep))  # [B, h, w, C]
      hole = 1.0 - family.nearest_to_latent(keep, c.shape[1], c.shape[2])  # [B, h, w, 1]
      # ... and maps the mask the same way: -1 = keep, +1 = hole.
      return Conditioning(concat=jnp.concatenate([c, (2.0 * hole - 1.0).astype(c.dtype)], -1))
    key = self.config.diffusion.conditioning_key
    if prompts is not None and not self.is_text:
      raise ValueError(f"prompts were given but this model is conditioned by {kind!r}, not text.")
    if labels is not None and kind != "class" and key != "adm":
      raise ValueError(f"class labels were given but this model is conditioned by {kind!r}.")
    if self.is_text:
      if prompts is None:
        raise ValueError("this is a text-conditional model: give prompts.")
      tokens = jnp.asarray(self.tokenize(prompts))
      context = cond_stage_fn(self.cond_stage, self.params["cond_stage"], tokens)
      if self.is_text_inpainting:
        return Conditioning(context=context, concat=self.inpaint_concat(images, mask))
      if self.is_upscaler:
        concat, y = self.augment_lowres(images, noise_level, lowres_noise)
        return Conditioning(context=context, concat=concat, y=y)
      if self.is_depth:
        if depth is None:
          raise ValueError("this is a depth-to-image model: give a depth map (no depth estimator "
                           "is bundled).")
        return Conditioning(context=context, concat=jnp.asarray(depth, jnp.float32))
      return Conditioning(context=context)
    if kind == "class":
      if labels is None:
        raise ValueError("this is a class-conditional model: give class labels.")
      labels = jnp.asarray(labels, jnp.int32)
      if key == "adm":
        return Conditioning(y=labels)
      return Conditioning(context=cond_stage_fn(self.cond_stage, self.params["cond_stage"], labels))
    if conditioning_lib.takes_concat(key) or kind == "spatial_rescaler":
      if images is None:
        raise ValueError("this model is conditioned by concatenation: give the conditioning image.")
      c = jnp.asarray(images)
      if self.cond_stage is not None:
        c = cond_stage_fn(self.cond_stage, self.params["cond_stage"], c)
      return Conditioning(concat=c)
    return Conditioning()

  def inpaint_concat(self, masked_image: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    """The concat condition of a Stable Diffusion inpainting model, in the config's `concat_keys`.

    masked_image: [B, H, W, 3] in [-1, 1], zero in the hole; mask: [B, H, W, 1], 1 = keep.
    'mask' is the hole (1 = repaint) taken at latent resolution by nearest neighbour (torch's
    `interpolate` default, which both CompVis and diffusers use); 'masked_image' is its scaled
    first-stage encoding (the posterior mode: deterministic, where the originals draw a sample).
    """
    if masked_image is None or mask is None:
      raise ValueError("this is an inpainting model: give the image and the mask.")
    z = self.encode(masked_image)  # [B, h, w, C]
    m = jnp.asarray(mask, jnp.float32)
    hole = 1.0 - family.nearest_to_latent(m, z.shape[1], z.shape[2])  # [B, h, w, 1]
    keys = tuple(self.config.diffusion.get("concat_keys", family.INPAINT_CONCAT_KEYS))
    return family.order_concat({"mask": hole.astype(z.dtype), "masked_image": z}, keys,
                               self.config.diffusion.get("masked_image_key", "masked_image"))

  def augment_lowres(self, lowres: jax.Array | None, noise_level: int | None,
                     noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The upscaler's concat and label: lowres [B, h, w, 3] in [-1, 1] noised to `noise_level`
    by its own schedule, sqrt(a_n) x + sqrt(1 - a_n) noise (noise [B, h, w, 3]; zeros if None).

    Returns (concat [B, h, w, 3], labels [B] int32 = noise_level).
    """
    if lowres is None:
      raise ValueError("this is an upscaling model: give the low-resolution image.")
    level = family.DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not (
        0 <= level <= self.max_noise_level):
      raise ValueError(f"noise_level={level!r}: expected an integer in [0, "
                       f"{self.max_noise_level}] (the model's max_noise_level).")
    x = jnp.asarray(lowres, jnp.float32)
    noise = jnp.zeros_like(x) if noise is None else jnp.asarray(noise, jnp.float32)
    if noise.shape != x.shape:
      raise ValueError(f"lowres_noise shape {noise.shape}: expected the image's {x.shape}.")
    ls = self.low_scale_schedule
    x = family.noise_lowres(ls.sqrt_alphas_cumprod, ls.alphas_cumprod, x, level, noise)
    return x, jnp.full((x.shape[0],), level, jnp.int32)

  def depth_condition(self, depth_map: np.ndarray, h: int, w: int) -> np.ndarray:
    """A depth map [B, H, W] (or [B, H, W, 1], any scale) -> the concat [B, h, w, 1] at latent
    size (`family.depth_concat`, with the config's `depth_eps`)."""
    return family.depth_concat(depth_map, h, w,
                               float(self.config.diffusion.get("depth_eps", 0.0)))

  def unconditional(self, cond: Conditioning, batch: int,
                    negative_prompts: Sequence[str] | None = None) -> Conditioning:
    """The 'null' conditioning for classifier-free guidance (concat inputs are kept, as CompVis).

    negative_prompts (text models): the unconditional branch encodes these instead of the empty
    prompt, one per sample; guidance then steers away from them.
    """
    if negative_prompts is not None and not self.is_text:
      raise ValueError(f"negative prompts were given but this model is conditioned by "
                       f"{self.cond_kind!r}, not text.")
    if self.is_text:
      negative = [""] * batch if negative_prompts is None else list(negative_prompts)
      if len(negative) != batch:
        raise ValueError(f"{len(negative)} negative prompts for a batch of {batch}: expected one "
                         f"per sample.")
      tokens = jnp.asarray(self.tokenize(negative))
      context = cond_stage_fn(self.cond_stage, self.params["cond_stage"], tokens)
      return dataclasses.replace(cond, context=context)
    if self.cond_kind == "class":
      return dataclasses.replace(self.condition(labels=[self.null_label] * batch),
                                 concat=cond.concat)
    return cond

  # ----------------------------------------------------------------------------------------------
  # Denoising and sampling.
  # ----------------------------------------------------------------------------------------------
  def denoise(self, z_t: jax.Array, t: jax.Array, cond: Conditioning) -> jax.Array:
    """The UNet's prediction (eps, x0 or v per the config) for noisy latents z_t at timesteps t."""
    return denoise_fn(self.unet, self.params["unet"], self.config.diffusion.conditioning_key,
                      z_t, t, cond)

  def sample(self, *, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
             images: jax.Array | None = None, num_samples: int | None = None,
             height: int | None = None, width: int | None = None, sampler: str | None = None,
             steps: int | None = None, eta: float = 0.0, guidance: float | None = None,
             guidance_rescale: float = 0.0, seed: int = 0, x_T: jax.Array | None = None,
             init_image: jax.Array | None = None, strength: float | None = None,
             mask: jax.Array | None = None, negative_prompt: str | Sequence[str] | None = None,
             noise_level: int | None = None, depth_map: np.ndarray | None = None,
             progress: bool = False, decode_tile: int | None = None,
             classifier: "sampling.NoisyClassifier | None" = None,
             classifier_scale: float = 1.0) -> np.ndarray:
    """Generates images; returns float32 [B, H, W, 3] in [-1, 1] (use `to_uint8`).

    sampler / steps / guidance: None takes the model's recommended settings (`sampling_settings`);
    the settings not given are printed, so a notebook shows what it sampled with.
    init_image + strength: img2img. init_image + mask (1 = keep, pixel resolution): inpainting by
    latent masking; for inpainting models (Stable Diffusion inpainting, the paper's inpainting_big)
    the same two inputs feed the model's condition instead. images: the concat condition (low-res
    image, semantic map). negative_prompt: text models with guidance; one for all samples or one
    per sample, encoded as the unconditional branch instead of the empty prompt. noise_level: the
    x4 upscaler's augmentation of its low-resolution `images` (default 20).
    depth_map: depth-to-image models, [B, H, W] supplied by the user (no estimator is bundled).
    classifier + classifier_scale: classifier guidance towards `labels` (one per sample) with a
    noisy-latent classifier from `load_classifier`; ddim, plms or ddpm. For an unconditional model
    the labels go to the classifier only.
    """
    s = self.sampling_settings(sampler=sampler, steps=steps, guidance=guidance)
    if any(v != "given" for v in s["source"].values()):
      print(f"LatentDiffusion.sample: {describe_sampling(s)}")
    return sampling.sample(self, prompts=prompts, labels=labels, images=images,
                           num_samples=num_samples, height=height, width=width,
                           sampler=s["sampler"], steps=s["steps"], eta=eta, guidance=s["guidance"],
                           guidance_rescale=guidance_rescale, seed=seed, x_T=x_T,
                           init_image=init_image, strength=strength, mask=mask,
                           negative_prompt=negative_prompt, noise_level=noise_level,
                           depth_map=depth_map, progress=progress, decode_tile=decode_tile,
                           classifier=classifier, classifier_scale=classifier_scale)

  def load_classifier(self, path: str) -> "sampling.NoisyClassifier":
    """A noisy-latent classifier for `sample(classifier=...)`: a workdir of the classifier task
    (train.py with configs/shapes_classifier.py or cin_classifier.py), or a CompVis /
    guided-diffusion classifier checkpoint, whose trunk follows this model's UNet config."""
    return sampling.load_classifier(path, self)

  # ----------------------------------------------------------------------------------------------
  # Construction, saving and loading.
  # ----------------------------------------------------------------------------------------------
  @classmethod
  def init(cls, config: Mapping[str, Any], rng: jax.Array, **kwargs) -> "LatentDiffusion":
    """Fresh random parameters for every component (small dummy inputs; shapes come from config)."""
    params = init_params(config, rng)
    return cls(config, params, **kwargs)

  def save(self, path: str) -> None:
    model_io.save_model(path, self.config, self.params)

  @classmethod
  def from_checkpoint(cls, path: str, *, use_ema: bool = True, **kwargs) -> "LatentDiffusion":
    """A directory written by `save`, by `python -m ldm_jax.convert`, or a training workdir."""
    config, params = model_io.load_model(path, use_ema=use_ema)
    return cls(config, params, **kwargs)

  @classmethod
  def from_compvis(cls, ckpt_path: str, yaml_path: str, *, use_ema: bool | None = None,
                   tokenizer_path: str | None = None, text_config_dir: str | None = None,
                   **kwargs) -> "LatentDiffusion":
    """use_ema None: the EMA weights when the checkpoint has them. text_config_dir: a local
    config.json of the text encoder when the YAML names one not known offline."""
    config, params = pipeline.load_compvis(ckpt_path, yaml_path, use_ema=use_ema,
                                           tokenizer_path=tokenizer_path,
                                           text_config_dir=text_config_dir)
    return cls(config, params, **kwargs)

  @classmethod
  def from_diffusers(cls, folder: str, **kwargs) -> "LatentDiffusion":
    config, params = pipeline.load_diffusers(folder)
    return cls(config, params, **kwargs)


def check_sampling_config(section: Mapping[str, Any], timesteps: int) -> None:
  """Refuses a `sampling` section a sampler could not run with: a ConfigError naming the field
  (`model.sampling.steps`), the value and what was expected."""
  sampling_settings.check(section, prefix="model.sampling.", timesteps=timesteps,
                          allowed=sampling_settings.RECOMMENDABLE, error=errors.ConfigError)


def describe_sampling(settings: Mapping[str, Any]) -> str:
  """One line naming the settings of `sampling_settings` and where the ones not given came from."""
  text = (f"sampler {settings['sampler']}, {settings['steps']} steps, guidance "
          f"{settings['guidance']:g}")
  origin = {"model": "the model's recommended settings", "default": "the library defaults"}
  notes = []
  for source, words in origin.items():
    names = [k for k, v in settings["source"].items() if v == source]
    if names:
      notes.append(f"{', '.join(names)} from {words}")
  return text + (f" ({'; '.join(notes)})" if notes else "")


