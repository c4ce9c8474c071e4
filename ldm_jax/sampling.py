"""Sampling from a `LatentDiffusion`: conditioning, guidance, img2img, inpainting, decoding.

The compiled sampler loop (`diffusion.samplers.sample`) treats its `denoise` function as static and
everything in `cond` as traced. Here `denoise` is a small hashable object that names only the UNet
module and the routing; the UNet parameters, the conditioning, the null conditioning and the guidance
scale all travel in `cond`, so new prompts, seeds or guidance scales reuse the compiled loop: it
compiles once per (shape, sampler, steps, eta, guidance on/off).
"""

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import errors
from ldm_jax import networks
from ldm_jax import parallel
from ldm_jax.diffusion import guidance as guidance_lib
from ldm_jax.diffusion import samplers as samplers_lib

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
  for key in ("cond", "uncond"):
    if key in payload:
      payload[key] = put(payload[key], batch_sharding)
  for key in ("scale", "rescale"):
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
           progress=False, decode=True,
           decode_tile=None, paste_known=True, mesh=None, as_numpy=True) -> np.ndarray:
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
                 as_numpy=as_numpy)
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
    cond = model.condition(prompts=prompts, labels=labels, images=concat, tokens=tokens,
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
  rng = jax.random.fold_in(jax.random.PRNGKey(int(seeds[0])), 1)
  if mesh is not None:
    payload, x_T, x0, m = shard_batch(mesh, payload, x_T, x0, m)
  z = samplers_lib.sample(denoise, model.schedule, x_T, payload, rng, sampler=sampler,
                          steps=int(steps), eta=float(eta),
                          parameterization=model.config.diffusion.parameterization, x0=x0,
                          mask=m, strength=strength, progress=progress)
  if not decode:
    return to_host(z) if as_numpy else z
  if decode_tile is None and max(h, w) > int(model.config.diffusion.image_size):
    decode_tile = int(model.config.diffusion.image_size)  # Bigger than trained: bounded memory.
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
