"""The three networks of a latent diffusion model as pure functions of explicit parameters.

First stage (encode / decode), condition encoder and UNet, with the conditioning routed into the
UNet as CompVis' DiffusionWrapper does, and `init_params`, which builds every component's variables
from a model config. `LatentDiffusion` (ldm.py) holds the modules and parameters and calls these;
the sampler (sampling.py), the trainer and the model loader (model_io.py, for the shapes a
checkpoint must have) use them directly, which keeps all three beneath `LatentDiffusion`.
"""

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.models import build


@dataclasses.dataclass
class Conditioning:
  """What the UNet is conditioned on; any field may be None. A pytree, so it passes through jit."""
  context: jax.Array | None = None  # [B, L, D] for cross-attention
  concat: jax.Array | None = None   # [B, h, w, c] concatenated to z_t on channels
  y: jax.Array | None = None        # [B] class labels or [B, adm] vectors for 'adm'


jax.tree_util.register_dataclass(Conditioning, data_fields=["context", "concat", "y"],
                                 meta_fields=[])


def model_config_defaults() -> ml_collections.ConfigDict:
  """Defaults of the diffusion part of a model config (the paper's LDM settings)."""
  return ml_collections.ConfigDict(dict(
      timesteps=1000, beta_schedule="linear", linear_start=0.0015, linear_end=0.0195,
      cosine_s=8e-3, zero_terminal_snr=False, parameterization="eps", conditioning_key=None,
      scale_factor=1.0, scale_by_std=False, image_size=32, channels=4))


# ------------------------------------------------------------------------------------------------
# Pure jitted functions (module objects are static: hashable dataclasses).
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0,))
def encode_fn(first_stage, variables, images, rng, scale_factor):
  if hasattr(first_stage, "quantize"):  # VQ: LDMs diffuse the pre-quantisation latents.
    h = first_stage.apply(variables, images, method=first_stage.encode)
    return h * scale_factor
  posterior = first_stage.apply(variables, images, method=first_stage.encode)
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return z * scale_factor  # [B, H/f, W/f, C]


@functools.partial(jax.jit, static_argnums=(0,))
def decode_fn(first_stage, variables, latents, scale_factor):
  return first_stage.apply(variables, latents / scale_factor, method=first_stage.decode)


@functools.partial(jax.jit, static_argnums=(0,))
def cond_stage_fn(cond_stage, variables, inputs):
  return cond_stage.apply(variables, inputs)


def denoise_fn(unet, variables, conditioning_key, z_t, t, cond: Conditioning, *,
               deterministic=True, rngs=None):
  """Routes the conditioning into the UNet as the CompVis DiffusionWrapper does."""
  x, context, y = z_t, None, None
  if conditioning_key in ("concat", "hybrid", "hybrid-adm"):
    x = jnp.concatenate([z_t, cond.concat.astype(z_t.dtype)], axis=-1)  # [B, h, w, C + c]
  if conditioning_key in ("crossattn", "hybrid", "hybrid-adm"):
    context = cond.context
  if conditioning_key in ("adm", "hybrid-adm"):
    y = cond.y
  t = jnp.broadcast_to(jnp.asarray(t), (z_t.shape[0],))
  out = unet.apply(variables, x, t, context, y, deterministic=deterministic, rngs=rngs)
  return out.astype(jnp.float32)


def init_params(config: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Random variables for first stage, UNet and condition encoder, from the model config."""
  config = ml_collections.ConfigDict(dict(config))
  diffusion = model_config_defaults()
  diffusion.update(dict(config.get("diffusion", {})))
  fs = build.build_first_stage(config.first_stage)
  unet = build.build_unet(config.unet)
  cs_cfg = dict(config.get("cond_stage", {}) or {"kind": "none"})
  cs = build.build_cond_stage(cs_cfg)
  k_fs, k_unet, k_cs = jax.random.split(rng, 3)
  ae = config.first_stage.kwargs
  f = 2 ** (len(ae.ch_mult) - 1)
  res = int(ae.get("resolution", 64))
  res = max(f * 4, min(res, f * 8))  # Small dummy input: parameter shapes do not depend on it.
  fs_rngs = {"params": k_fs, "sample": jax.random.fold_in(k_fs, 1)}
  params = {"first_stage": jax.jit(fs.init)(fs_rngs, jnp.zeros((1, res, res, ae.in_channels)))}
  dummy_cond = example_conditioning(config, cs_cfg, cs, k_cs)
  params["cond_stage"] = dummy_cond.pop("variables")
  h = w = max(diffusion.image_size // 4, 2 ** len(config.unet.channel_mult))
  z = jnp.zeros((1, h, w, config.unet.in_channels - dummy_cond["concat_channels"]))
  cond = Conditioning(context=dummy_cond["context"], y=dummy_cond["y"],
                      concat=(jnp.zeros((1, h, w, dummy_cond["concat_channels"]))
                              if dummy_cond["concat_channels"] else None))
  key = diffusion.conditioning_key

  def unet_init(k):
    x, context, y = z, None, None
    if key in ("concat", "hybrid", "hybrid-adm"):
      x = jnp.concatenate([z, cond.concat], -1)
    if key in ("crossattn", "hybrid", "hybrid-adm"):
      context = cond.context
    if key in ("adm", "hybrid-adm"):
      y = cond.y
    return unet.init(k, x, jnp.zeros((1,), jnp.int32), context, y)

  params["unet"] = jax.jit(unet_init)(k_unet)
  return params


def example_conditioning(config, cs_cfg, cs, rng) -> dict[str, Any]:
  """Dummy conditioning inputs for initialisation, plus the condition encoder's variables."""
  unet = config.unet
  kind = cs_cfg.get("kind", "none")
  out = {"variables": {}, "context": None, "y": None, "concat_channels": 0}
  key = config.get("diffusion", {}).get("conditioning_key")
  if key in ("concat", "hybrid", "hybrid-adm"):
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
