"""The three networks of a latent diffusion model as pure functions of explicit parameters.

First stage (encode / decode), condition encoder and UNet, with the conditioning routed into the
UNet as CompVis' DiffusionWrapper does, and `init_params`, which builds every component's variables
from a model config. `LatentDiffusion` (ldm.py) holds the modules and parameters and calls these;
the sampler (sampling.py), the trainer and the model loader (model_io.py, for the shapes a
checkpoint must have) use them directly, which keeps all three beneath `LatentDiffusion`.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.diffusion import defaults as diffusion_defaults
from ldm_jax.diffusion import schedules as schedules_lib
from ldm_jax.kernels import platform
from ldm_jax.models import build
from ldm_jax.models import conditioning as conditioning_lib
# The condition's pytree is the conditioning module's; re-exported as `networks.Conditioning`.
from ldm_jax.models.conditioning import Conditioning  # pylint: disable=unused-import


def diffusion_section(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The model config's `diffusion` section with every field the defaults give filled in."""
  # Updating the typed defaults (not building from the merged dict) keeps their types: a saved
  # integer scale_factor still becomes a float field that training may set to 0.18.
  section = ml_collections.ConfigDict(diffusion_defaults.DEFAULTS)
  section.update(dict(config.get("diffusion") or {}))
  return section


def noise_schedule(config: Mapping[str, Any]) -> schedules_lib.Schedule:
  """The forward-process schedule of a model config's `diffusion` section (defaults filled in)."""
  d = diffusion_section(config)
  return schedules_lib.Schedule.create(
      d.beta_schedule, d.timesteps, linear_start=d.linear_start, linear_end=d.linear_end,
      cosine_s=d.cosine_s, zero_terminal_snr=d.zero_terminal_snr)


# ------------------------------------------------------------------------------------------------
# Pure jitted functions (module objects are static: hashable dataclasses).
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0,))
def _encode(first_stage, variables, images, rng, scale_factor):
  if hasattr(first_stage, "quantize"):  # VQ: LDMs diffuse the pre-quantisation latents.
    h = first_stage.apply(variables, images, method=first_stage.encode)
    return h * scale_factor
  posterior = first_stage.apply(variables, images, method=first_stage.encode)
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return z * scale_factor  # [B, H/f, W/f, C]


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(first_stage, variables, latents, scale_factor):
  return first_stage.apply(variables, latents / scale_factor, method=first_stage.decode)


# The autoencoder's attention runs at up to 4096 tokens (its middle block at 64x64), so its
# programs are traced for the devices of their inputs: on TPU that runs the Pallas kernel.
def encode_fn(first_stage, variables, images, rng, scale_factor):
  """Images [B, H, W, 3] in [-1, 1] -> scaled latents (the posterior's mode, or a sample with rng)."""
  with platform.devices_context(variables, images):
    return _encode(first_stage, variables, images, rng, scale_factor)


def decode_fn(first_stage, variables, latents, scale_factor):
  """Scaled latents -> images [B, H, W, 3] in (about) [-1, 1]."""
  with platform.devices_context(variables, latents):
    return _decode(first_stage, variables, latents, scale_factor)


@functools.partial(jax.jit, static_argnums=(0,))
def cond_stage_fn(cond_stage, variables, inputs):
  return cond_stage.apply(variables, inputs)


def denoise_fn(unet, variables, conditioning_key, z_t, t, cond: Conditioning, *,
               deterministic=True, rngs=None):
  """The UNet's prediction for z_t [B, h, w, C] at t, the conditioning routed by its key."""
  x, context, y = conditioning_lib.unet_inputs(conditioning_key, z_t, cond)
  t = jnp.broadcast_to(jnp.asarray(t), (z_t.shape[0],))
  out = unet.apply(variables, x, t, context, y, deterministic=deterministic, rngs=rngs)
  return out.astype(jnp.float32)


def init_params(config: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Random variables for first stage, UNet and condition encoder, from the model config."""
  config = ml_collections.ConfigDict(dict(config))
  diffusion = diffusion_section(config)
  fs = build.build_first_stage(config.first_stage)
  unet = build.build_unet(config.unet)
  cs_cfg = dict(config.get("cond_stage", {}) or {"kind": "none"})
  cs = build.build_cond_stage(cs_cfg)
  k_fs, k_unet, k_cs = jax.random.split(rng, 3)
  params = {"first_stage": _init_first_stage(fs, config.first_stage, k_fs)}
  dummy_cond = example_conditioning(config, cs_cfg, cs, k_cs)
  params["cond_stage"] = dummy_cond.pop("variables")
  h = w = max(diffusion.image_size // 4, 2 ** len(config.unet.channel_mult))
  z = jnp.zeros((1, h, w, config.unet.in_channels - dummy_cond["concat_channels"]))
  cond = Conditioning(context=dummy_cond["context"], y=dummy_cond["y"],
                      concat=(jnp.zeros((1, h, w, dummy_cond["concat_channels"]))
                              if dummy_cond["concat_channels"] else None))

  def unet_init(k):
    x, context, y = conditioning_lib.unet_inputs(diffusion.conditioning_key, z, cond)
    return unet.init(k, x, jnp.zeros((1,), jnp.int32), context, y)

  params["unet"] = jax.jit(unet_init)(k_unet)
  return params


def init_first_stage(config: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Random variables of the autoencoder a model config's `first_stage` section describes."""
  config = ml_collections.ConfigDict(dict(config))
  return _init_first_stage(build.build_first_stage(config), config, rng)


def _init_first_stage(fs, config, rng) -> dict[str, Any]:
  ae = config.kwargs
  f = 2 ** (len(ae.ch_mult) - 1)
  res = int(ae.get("resolution", 64))
  res = max(f * 4, min(res, f * 8))  # Small dummy input: parameter shapes do not depend on it.
  rngs = {"params": rng, "sample": jax.random.fold_in(rng, 1)}
  return jax.jit(fs.init)(rngs, jnp.zeros((1, res, res, ae.in_channels)))


def example_conditioning(config, cs_cfg, cs, rng) -> dict[str, Any]:
  """Dummy conditioning inputs for initialisation, plus the condition encoder's variables."""
  unet = config.unet
  kind = cs_cfg.get("kind", "none")
  out = {"variables": {}, "context": None, "y": None, "concat_channels": 0}
  key = config.get("diffusion", {}).get("conditioning_key")
  if conditioning_lib.takes_concat(key):
    out["concat_channels"] = int(unet.in_channels) - int(config.first_stage.kwargs.embed_dim)
  if kind in build.TEXT_ENCODERS:
    length = int(cs_cfg.get("kwargs", {}).get("max_length", 77))
    tokens = jnp.zeros((1, length), jnp.int32)
    out["variables"] = jax.jit(cs.init)(rng, tokens)
    out["context"] = cs.apply(out["variables"], tokens)
  elif kind == "class":
    labels = jnp.zeros((1,), jnp.int32)
    out["variables"] = jax.jit(cs.init)(rng, labels)
    if key == "adm":
      out["y"] = labels
    else:
      out["context"] = cs.apply(out["variables"], labels)
  elif kind == "spatial_rescaler":
    ch = int(cs_cfg["kwargs"].get("in_channels", 3))
    size = 2 ** int(cs_cfg["kwargs"].get("n_stages", 1)) * 8
    out["variables"] = jax.jit(cs.init)(rng, jnp.zeros((1, size, size, ch)))
  elif key == "adm":
    out["y"] = jnp.zeros((1, int(unet.adm_in_channels)))
  if key == "hybrid-adm":
    out["y"] = jnp.zeros((1,), jnp.int32)  # The noise level, a class label.
  if key == "crossattn" and out["context"] is None:
    out["context"] = jnp.zeros((1, 1, int(unet.context_dim)))
  return out
