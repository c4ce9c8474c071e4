"""Sampling from a `LatentDiffusion`: conditioning, guidance, img2img, inpainting, decoding.

The compiled sampler loop (`diffusion.samplers.sample`) treats its `denoise` function as static and
everything in `cond` as traced. Here `denoise` is a small hashable object that names only the UNet
module and the routing; the UNet parameters, the conditioning, the null conditioning and the guidance
scale all travel in `cond`, so new prompts, seeds or guidance scales reuse the compiled loop: it
compiles once per (shape, sampler, steps, eta, guidance on/off, classifier network).

Classifier guidance (`ClassifierGuidedDenoiser`) wraps the same denoiser: the classifier's
parameters, the target labels, the scale and the schedule travel in `cond` as well, and the eps
correction (`diffusion.classifier_guidance.guide_output`) runs inside the compiled loop.
`load_classifier` reads a classifier's training workdir or a CompVis / guided-diffusion file.
"""

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import errors
from ldm_jax import model_io
from ldm_jax import networks
from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.convert import classifier as convert_classifier
from ldm_jax.diffusion import classifier_guidance as cg
from ldm_jax.diffusion import guidance as guidance_lib
from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.kernels import platform
from ldm_jax.models import classifier as classifier_lib

# The default of the command lines' --num_devices when the flag is left out (unset: 0, every local
# device); the test suite sets 1 so command-line tests that are not about sharding stay fast.
NUM_DEVICES_ENV = "LDM_JAX_NUM_DEVICES"


class SamplingInputError(errors.InputError):
  """Inputs that cannot be sampled (wrong sizes, missing condition): a user mistake."""


@dataclasses.dataclass(frozen=True)
class UNetDenoiser:
  """denoise(x_t, t, cond) for the sampler; `cond` = {params, cond, uncond?, scale?, rescale?}."""
  unet: Any
  conditioning_key: str | None
  guided: bool

  def __call__(self, x_t, t, c):
    if not self.guided:
      return networks.denoise_fn(self.unet, c["params"], self.conditioning_key, x_t, t, c["cond"])
    # One batched pass over [uncond, cond] (uncond first, as CompVis).
    both = jax.tree.map(lambda u, v: jnp.concatenate([u, v], 0), c["uncond"], c["cond"])
    x2 = jnp.concatenate([x_t, x_t], 0)  # [2B, h, w, C]
    t2 = jnp.concatenate([t, t], 0)
    out_u, out_c = jnp.split(networks.denoise_fn(self.unet, c["params"], self.conditioning_key,
                                                x2, t2, both), 2)
    return guidance_lib.combine_guidance(out_u, out_c, c["scale"], c["rescale"])


# The samplers classifier guidance runs with: they call the network at the integer training
# timesteps the classifier learnt, and read its guided eps.
CLASSIFIER_SAMPLERS = ("ddim", "plms", "ddpm")
# The schedule fields a classifier must share with the model it guides.
SCHEDULE_FIELDS = ("beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s",
                   "zero_terminal_snr")


@dataclasses.dataclass(frozen=True)
class ClassifierGuidedDenoiser:
  """`inner` with classifier guidance; `cond` adds classifier_params, class_labels [B],
  classifier_scale and schedule (all traced: a new scale or label reuses the compiled loop)."""
  inner: Any
  classifier: Any  # an EncoderUNet
  parameterization: str

  def __call__(self, x_t, t, c):
    out = self.inner(x_t, t, c)
    logits = lambda p, x, t_: self.classifier.apply({"params": p}, x, t_)  # [B, K]
    return cg.guide_output(out, x_t, t, c["class_labels"], c["classifier_scale"],
                           classifier=logits, classifier_params=c["classifier_params"],
                           schedule=c["schedule"], parameterization=self.parameterization)


@dataclasses.dataclass(frozen=True)
class NoisyClassifier:
  """A noisy-latent classifier ready to guide sampling (`load_classifier`).

  module: the EncoderUNet; params: its parameter tree; latent: the latent space it was trained
  on (classifier.json's: channels, image_size, scale_factor, schedule), None for an imported
  checkpoint (built from the model's own UNet config, so nothing to compare); source: its path.
  """
  module: Any
  params: Any
  latent: dict | None = None
  source: str = ""

  @property
  def num_classes(self) -> int:
    return int(self.module.num_classes)


def load_classifier(path: str, model) -> NoisyClassifier:
  """A classifier for `model`: a training workdir of the classifier task (classifier.json and its
  newest checkpoint), or a CompVis / guided-diffusion checkpoint file whose trunk is built from the
  model's UNet config (as CompVis builds it). Raises a UserError for anything unusable."""
  if os.path.isdir(path):
    info_path = layout.classifier_path(path)
    try:
      with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
      kwargs = dict(info["kwargs"])
      kwargs.update({k: tuple(kwargs[k]) for k in ("attention_resolutions", "channel_mult")})
      module = classifier_lib.EncoderUNet(**kwargs)
      latent = dict(info["latent"])
    except FileNotFoundError:
      raise errors.CheckpointNotFoundError(
          f"--classifier={path}: no {layout.CLASSIFIER_FILE}; expected a workdir of the "
          f"classifier task (train.py --config configs/shapes_classifier.py) or a classifier "
          f"checkpoint file.") from None
    except (ValueError, KeyError, TypeError) as e:
      raise errors.CheckpointError(f"{info_path}: not a classifier description "
                                   f"({type(e).__name__}: {e}).") from None
    params = model_io.restore_trained_params(path)
    if params is None:
      raise errors.CheckpointNotFoundError(f"--classifier={path}: no complete checkpoint in "
                                           f"{layout.checkpoints_dir(path)}.")
    return NoisyClassifier(module, params, latent, path)
  unet = model.config.unet
  unet = unet.to_dict() if hasattr(unet, "to_dict") else dict(unet)
  kwargs, params = convert_classifier.load_for_unet(path, unet,
                                                    int(model.config.diffusion.image_size))
  return NoisyClassifier(classifier_lib.EncoderUNet(**kwargs), params, None, path)


def check_classifier(model, classifier: NoisyClassifier, labels, sampler: str,
                     latent_hw: tuple[int, int]) -> None:
  """Refuses a classifier that cannot guide `model` here (SamplingInputError naming the
  mismatch): another sampler, latent shape, schedule or scale, or labels outside its classes."""
  where = f"classifier {classifier.source}".rstrip()
  if samplers_lib.resolve(sampler) not in CLASSIFIER_SAMPLERS:
    raise SamplingInputError(f"sampler {sampler!r} with a classifier: classifier guidance runs "
                             f"with {', '.join(CLASSIFIER_SAMPLERS)}.")
  module = classifier.module
  if module.in_channels != model.latent_channels:
    raise SamplingInputError(f"{where} reads {module.in_channels}-channel latents; this model's "
                             f"have {model.latent_channels}.")
  if module.pool == "attention" and tuple(latent_hw) != (module.image_size,) * 2:
    raise SamplingInputError(f"{where} takes {module.image_size}x{module.image_size} latents "
                             f"(its attention head); this sample's are "
                             f"{latent_hw[1]}x{latent_hw[0]}.")
  if classifier.latent is not None:
    d = model.config.diffusion
    for field in SCHEDULE_FIELDS:
      if classifier.latent["schedule"].get(field) != d[field]:
        raise SamplingInputError(f"{where} was trained with diffusion.{field}="
                                 f"{classifier.latent['schedule'].get(field)!r}; this model has "
                                 f"{d[field]!r}.")
    if not np.isclose(classifier.latent["scale_factor"], model.scale_factor, rtol=1e-5):
      raise SamplingInputError(f"{where} was trained on latents scaled by "
                               f"{classifier.latent['scale_factor']:.6g}; this model's "
                               f"scale_factor is {model.scale_factor:.6g}.")
  if model.cond_kind == "class":
    n = int(model.cond_stage_config.get("kwargs", {}).get("n_classes", 0))
    if classifier.num_classes not in (n, model.null_label):
      raise SamplingInputError(f"{where} has {classifier.num_classes} classes; this model has "
                               f"{n} class labels (the null label {model.null_label} "
                               f"included).")
  if labels is None:
    raise SamplingInputError("a classifier was given without labels: classifier guidance needs "
                             "the class of every sample.")
  bad = [int(l) for l in np.ravel(np.asarray(labels)) if not 0 <= int(l) < classifier.num_classes]
  if bad:
    raise SamplingInputError(f"class label {bad[0]} with {where}: expected 0 <= label < "
                             f"{classifier.num_classes}.")


def batch_shards(mesh) -> int:
  """How many slices the mesh's batch axes (data, fsdp) cut a batch into."""
  return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def local_mesh(num_devices: int | None = None, field: str = "--num_devices"):
  """A ('data',) mesh over the first N of this process's devices, or None for one device.

  num_devices: 0 = every local device; None = $LDM_JAX_NUM_DEVICES, else 0. Local devices only:
  the command lines do not split their work between hosts, so every host samples its own batch.
  field: the name the caller's users know the setting by, for the error.
  """
  if num_devices is None:
    raw = os.environ.get(NUM_DEVICES_ENV, "0")
    try:
      num_devices = int(raw)
    except ValueError:
      raise SamplingInputError(f"${NUM_DEVICES_ENV}={raw!r}: expected an integer number of "
                               f"devices (0 = all).") from None
    field = f"${NUM_DEVICES_ENV}"
  devices = jax.local_devices()
  if not 0 <= num_devices <= len(devices):
    raise SamplingInputError(f"{field}={num_devices}: expected 0 (all) or 1..{len(devices)} "
                             f"(the devices of this host).")
  n = num_devices or len(devices)
  if n == 1:
    return None
  return parallel.make_mesh({"data": n}, devices=devices[:n])


def shard_batch(mesh, payload, x_T, x0, mask):
  """Places batch-leading inputs on the mesh's batch axes and the UNet parameters replicated."""
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  if x_T.shape[0] % batch_shards(mesh):  # `sample` pads the batch first; this guards other callers.
    raise SamplingInputError(f"batch of {x_T.shape[0]} cannot be split over the "
                             f"{batch_shards(mesh)} batch shards of the mesh.")
  put = lambda tree, sharding: jax.tree.map(lambda a: jax.device_put(a, sharding), tree)
  payload = dict(payload, params=put(payload["params"], replicated))
  for key in ("cond", "uncond", "class_labels"):
    if key in payload:
      payload[key] = put(payload[key], batch_sharding)
  for key in ("scale", "rescale", "classifier_params", "classifier_scale", "schedule"):
    if key in payload:
      payload[key] = put(payload[key], replicated)
  x_T = put(x_T, batch_sharding)
  x0 = None if x0 is None else put(x0, batch_sharding)
  mask = None if mask is None else put(mask, batch_sharding)
  return payload, x_T, x0, mask


def repeat_last(x, batch: int, extra: int, name: str = "input"):
  """A per-sample input (list or array of `batch` rows) with its last row repeated `extra` times.

  None, one string for every sample and an array of one row (broadcast) pass unchanged; any other
  length raises SamplingInputError naming the input, before a padded batch size could mislead.
  """
  if x is None or isinstance(x, str):
    return x
  if isinstance(x, (list, tuple)):
    if len(x) != batch:
      raise SamplingInputError(f"{name}: {len(x)} entries for a batch of {batch}.")
    return list(x) + [x[-1]] * extra
  if np.ndim(x) == 0 or (np.shape(x)[0] == 1 and batch != 1):
    return x
  if np.shape(x)[0] != batch:
    raise SamplingInputError(f"{name} of shape {tuple(np.shape(x))}: expected {batch} rows, one "
                             f"per sample.")
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


def to_host(x) -> np.ndarray:
  """A device array as numpy, gathered from every host when the mesh spans several."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
  """x_T per sample from its own seed, so a sample does not depend on its batch mates."""
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)  # [B, *shape]


def lowres_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
  """The upscaler's image-space noise per sample, from its seed (a stream apart from x_T's)."""
  keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 2) for s in seeds])
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)  # [B, *shape]


def latent_mask(mask: np.ndarray, h: int, w: int) -> jax.Array:
  """Pixel mask [B, H, W, 1] (1 = keep) -> latent resolution by area averaging, then threshold."""
  b, H, W, _ = mask.shape
  fh, fw = H // h, W // w
  m = np.asarray(mask, np.float32).reshape(b, h, fh, w, fw, 1).mean(axis=(2, 4))
  return jnp.asarray((m > 0.5).astype(np.float32))  # [B, h, w, 1]


def negative_prompts(negative_prompt, batch: int, model, guided: bool) -> list[str] | None:
  """`negative_prompt` (None, one string, or one per sample) as one string per sample."""
  if negative_prompt is None:
    return None
  if not model.is_text:
    raise SamplingInputError(f"a negative prompt was given, but this model is conditioned by "
                             f"{model.cond_kind!r}, not text.")
  if not guided:
    raise SamplingInputError("a negative prompt acts only through classifier-free guidance: "
                             "expected guidance != 1.")
  if isinstance(negative_prompt, str):
    return [negative_prompt] * batch
  negative = list(negative_prompt)
  if len(negative) != batch or not all(isinstance(p, str) for p in negative):
    raise SamplingInputError(f"negative_prompt: {len(negative)} entries for a batch of {batch}; "
                             f"expected one string, or one string per sample.")
  return negative


def sample(model, *, prompts=None, labels=None, images=None, tokens=None,
           num_samples=None, height=None, width=None, sampler=None, steps=None, eta=0.0,
           guidance=None, guidance_rescale=0.0, seed=0, seeds=None, x_T=None, init_image=None,
           strength=None, mask=None, negative_prompt=None, noise_level=None, depth_map=None,
           progress=False, decode=True, decode_tile=None, paste_known=True, mesh=None,
           as_numpy=True, classifier=None, classifier_scale=1.0) -> np.ndarray:
  """See `LatentDiffusion.sample`; returns float32 images [B, H, W, 3] in [-1, 1] (or latents).

  model: a `LatentDiffusion` (ldm.py), which sits above this module and calls it.

  sampler / steps / guidance: None takes the model's recommended setting (`sampling_settings`).
  seeds: one per sample (default seed, seed+1, ...): x_T of sample i comes from seeds[i] alone.
  negative_prompt: a string for every sample or a list with one per sample (text models with
    guidance != 1): the unconditional branch of guidance encodes it instead of the empty prompt.
  noise_level: the x4 upscaler's augmentation of its low-resolution input `images` (default
    20); the image-space noise comes from each sample's seed (`lowres_noise`).
  depth_map: depth-to-image models, [B, H, W] at any resolution (see `depth_condition`).
  paste_known: inpainting returns the input's pixels exactly where mask == 1.
  mesh: shard the batch over the mesh's (data, fsdp) axes (parameters replicated), so each device
    samples only its slice. A batch those axes do not divide is filled up with copies of its last
    sample (inputs and seed) and cut back after: the real samples are the ones an unsharded call
    makes. On a mesh over several hosts every host passes the same inputs and gets every sample.
  as_numpy: False returns the device array (sharded like the batch when a mesh is given).
  classifier: a `NoisyClassifier` (`load_classifier`): classifier guidance towards `labels` with
    `classifier_scale` (0 = unguided), with the samplers in CLASSIFIER_SAMPLERS. The labels feed
    only the classifier, unless the model is class-conditional (then both, with classifier-free
    guidance as usual).
  """
  chosen = model.sampling_settings(sampler=sampler, steps=steps, guidance=guidance)
  sampler, steps, guidance = chosen["sampler"], chosen["steps"], chosen["guidance"]
  f = model.downsample_factor
  batch = next((len(x) for x in (prompts, tokens, labels, seeds, images, init_image)
                if x is not None), num_samples or 1)
  seeds = list(seeds) if seeds is not None else [seed + i for i in range(batch)]
  if len(seeds) != batch:
    raise SamplingInputError(f"{len(seeds)} seeds for a batch of {batch}.")
  extra = 0 if mesh is None else -batch % batch_shards(mesh)
  if extra:
    # Every sample depends only on its own inputs and seed (`initial_noise`, per-sample
    # conditioning, and step noise drawn elementwise), so the copies leave the real samples as
    # they are; one compiled shape per shard count rather than a refused batch.
    grow = lambda name, x: repeat_last(x, batch, extra, name)
    out = sample(model, prompts=grow("prompts", prompts), labels=grow("labels", labels),
                 images=grow("images", images), tokens=grow("tokens", tokens), height=height,
                 width=width, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                 guidance_rescale=guidance_rescale, seeds=grow("seeds", seeds),
                 x_T=grow("x_T", x_T), init_image=grow("init_image", init_image),
                 strength=strength, mask=grow("mask", mask),
                 negative_prompt=grow("negative_prompt", negative_prompt),
                 noise_level=noise_level, depth_map=grow("depth_map", depth_map), progress=progress,
                 decode=decode, decode_tile=decode_tile, paste_known=paste_known, mesh=mesh,
                 as_numpy=as_numpy, classifier=classifier, classifier_scale=classifier_scale)
    return out[:batch]
  default = int(model.config.diffusion.image_size) * f
  if model.is_upscaler and images is not None:  # The upscaler's latents are its input's size.
    default_h, default_w = np.shape(images)[1] * f, np.shape(images)[2] * f
  else:
    default_h = default_w = default
  height, width = height or default_h, width or default_w
  if height % f or width % f:
    raise SamplingInputError(f"height={height}, width={width}: expected multiples of {f}.")
  h, w = height // f, width // f
  shape = (h, w, model.latent_channels)
  if x_T is None:
    x_T = initial_noise(seeds, shape)
  elif tuple(x_T.shape) != (batch,) + shape:
    raise SamplingInputError(f"x_T shape {tuple(x_T.shape)}: expected {(batch,) + shape}.")

  if classifier is not None:
    check_classifier(model, classifier, labels, sampler, (h, w))
  # The labels of an unconditional model are the classifier's alone.
  cond_labels = labels if classifier is None or model.cond_kind == "class" else None

  # Conditioning (and its null version for classifier-free guidance).
  concat = None
  if noise_level is not None and not model.is_upscaler:
    raise SamplingInputError("noise_level was given, but this model is not an upscaler.")
  if depth_map is not None and not model.is_depth:
    raise SamplingInputError("a depth map was given, but this is not a depth-to-image model.")
  depth = None
  if depth_map is not None:
    if len(depth_map) != batch:
      raise SamplingInputError(f"{len(depth_map)} depth maps for a batch of {batch}.")
    try:
      depth = model.depth_condition(depth_map, h, w)
    except ValueError as e:
      raise SamplingInputError(str(e)) from None
  if model.is_upscaler and images is not None and tuple(np.shape(images)[1:3]) != (h, w):
    raise SamplingInputError(f"low-resolution image of {np.shape(images)[2]}x"
                             f"{np.shape(images)[1]} px: this upscaler makes {f}x larger images; "
                             f"for {width}x{height} give {w}x{h}.")
  if images is not None:
    concat = jnp.asarray(images)
    if concat.shape[1:3] != (h, w) and model.cond_stage is None:
      raise SamplingInputError(f"conditioning image of {concat.shape[2]}x{concat.shape[1]} px: this "
                               f"model concatenates it to {w}x{h} latents; give that size.")
  inpaint_model = model.is_inpainting
  if inpaint_model:
    if images is not None:
      raise SamplingInputError("this inpainting model is conditioned on init_image and mask; "
                               "`images` is not used by it.")
    if init_image is None or mask is None:
      raise SamplingInputError("this inpainting model needs an init image and a mask.")
    concat = jnp.asarray(init_image) * jnp.asarray(mask)  # The known pixels; the hole is zeroed.
  guided = float(guidance) != 1.0 and tokens is None and (model.is_text or
                                                          model.cond_kind == "class")
  negative = negative_prompts(negative_prompt, batch, model, guided)
  try:
    lowres = None
    if model.is_upscaler and concat is not None:
      lowres = lowres_noise(seeds, tuple(concat.shape[1:]))
    cond = model.condition(prompts=prompts, labels=cond_labels, images=concat, tokens=tokens,
                           mask=None if not inpaint_model else jnp.asarray(mask),
                           noise_level=noise_level, lowres_noise=lowres, depth=depth)
    payload = {"params": model.params["unet"], "cond": cond}
    if guided:
      payload.update(uncond=model.unconditional(cond, batch, negative),
                     scale=jnp.float32(guidance), rescale=jnp.float32(guidance_rescale))
  except ValueError as e:
    raise SamplingInputError(str(e)) from None

  # img2img / inpainting start from the encoded input image.
  x0 = m = None
  if init_image is not None:
    init = jnp.asarray(init_image, jnp.float32)
    if init.shape[1:3] != (height, width):
      raise SamplingInputError(f"init image {init.shape[2]}x{init.shape[1]}: expected "
                               f"{width}x{height}.")
    x0 = model.encode(init)  # posterior mode, scaled
  if mask is not None and not inpaint_model:  # Inpainting by latent masking (any model).
    if x0 is None:
      raise SamplingInputError("a mask needs an init image.")
    m = latent_mask(np.asarray(mask), h, w)
  if inpaint_model and strength is None:
    x0 = None  # The model inpaints from its condition; it starts from pure noise.

  denoise = UNetDenoiser(model.unet, model.config.diffusion.conditioning_key, guided)
  if classifier is not None:
    denoise = ClassifierGuidedDenoiser(denoise, classifier.module,
                                       model.config.diffusion.parameterization)
    payload.update(classifier_params=classifier.params,
                   class_labels=jnp.asarray(labels, jnp.int32).reshape(batch),
                   classifier_scale=jnp.float32(classifier_scale), schedule=model.schedule)
  rng = jax.random.fold_in(jax.random.PRNGKey(int(seeds[0])), 1)
  if mesh is not None:
    payload, x_T, x0, m = shard_batch(mesh, payload, x_T, x0, m)
  if decode_tile is None and max(h, w) > int(model.config.diffusion.image_size):
    decode_tile = int(model.config.diffusion.image_size)  # Bigger than trained: bounded memory.
  # The loop and the decoder are traced for the devices of their inputs (the mesh, or the one
  # device), so that on TPU their attention runs the Pallas flash kernel; the tiled decoder needs
  # this context, as it traces decode_fn inside its own jit. (Conditioning above reads host
  # inputs, which a program traced for a multi-device mesh cannot take; its attention keeps the
  # einsum form.)
  with platform.devices_context(payload, x_T):
    z = samplers_lib.sample(denoise, model.schedule, x_T, payload, rng, sampler=sampler,
                            steps=int(steps), eta=float(eta),
                            parameterization=model.config.diffusion.parameterization, x0=x0,
                            mask=m, strength=strength, progress=progress)
    if not decode:
      return to_host(z) if as_numpy else z
    images = model.decode(z, tile=decode_tile)
  if not as_numpy:
    return images
  images = to_host(images)
  if mask is not None and paste_known:
    # The latents of the known region are exact, but the decoder (attention in its middle block)
    # mixes them with the generated region: paste the known pixels back, as inpainting pipelines do.
    m = np.asarray(mask, np.float32)
    images = m * np.asarray(init_image, np.float32) + (1.0 - m) * images
  return images


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 image with the samples in rows of `cols`."""
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid
