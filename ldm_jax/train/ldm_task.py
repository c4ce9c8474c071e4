"""Stage 2: the latent diffusion objective as a `loss_fn(params, batch, rng)` for the generic step.

Frozen parts (the first stage, a frozen pretrained text encoder) run *outside* the train step in
`encode_batch`, which turns an image batch into latents (+ context or concat inputs) with its own jitted
functions. The train step therefore sees only trainable parameters: the UNet, plus the paper's text
transformer when it is trained jointly (`cond_stage` in `params`).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax import parallel
from ldm_jax.diffusion import objectives

FROZEN_TEXT = ("clip", "openclip", "bert")


def trains_cond_stage(model: ldm_lib.LatentDiffusion, config) -> bool:
  """The paper's text transformer and class embedders train with the UNet; CLIP/BERT stay frozen."""
  kind = model.cond_kind
  if kind in FROZEN_TEXT or model.cond_stage is None:
    return False
  return bool(config.train.train_cond_stage)


def trainable_params(model: ldm_lib.LatentDiffusion, config) -> dict[str, Any]:
  params = {"unet": model.params["unet"]}
  if trains_cond_stage(model, config):
    params["cond_stage"] = model.params["cond_stage"]
  if config.train.learn_logvar:
    params["logvar"] = jnp.full((model.schedule.num_timesteps,), config.train.logvar_init,
                                jnp.float32)
  return params


def null_inputs(model: ldm_lib.LatentDiffusion) -> dict[str, np.ndarray]:
  """What a dropped condition becomes: the empty prompt's tokens, or the null class."""
  if model.is_text:
    return {"tokens": model.tokenize([""])[0]}
  if model.cond_kind == "class":
    n = int(model.cond_stage_config.get("kwargs", {}).get("n_classes", 1))
    return {"label": np.int32(n - 1)}
  return {}


def encode_batch(model: ldm_lib.LatentDiffusion, batch: Mapping[str, Any], rng: jax.Array,
                 config, mesh=None) -> dict[str, Any]:
  """Host batch -> the train step's inputs: scaled latents z, and tokens/labels/context/concat.

  Captions are tokenised on the host; every array is then assembled into a global batch-sharded
  array (each host contributes its shard) before the frozen encoders run on it.
  """
  local = {"image": np.asarray(batch["image"], np.float32)}
  kind = model.cond_kind
  if model.is_text:
    local["tokens"] = model.tokenize([str(c) for c in batch["caption"]])
  elif kind == "class":
    local["label"] = np.asarray(batch["label"], np.int32)
  if "concat" in batch:  # Concat inputs are prepared at latent resolution by the data pipeline.
    local["concat"] = np.asarray(batch["concat"], np.float32)
  arrays = (parallel.make_global_batch(local, mesh) if mesh is not None
            else jax.tree.map(jnp.asarray, local))
  out = {k: v for k, v in arrays.items() if k != "image"}
  out["z"] = model.encode(arrays["image"], rng)
  if "tokens" in out and not trains_cond_stage(model, config):
    out["context"] = ldm_lib.cond_stage_fn(model.cond_stage, model.params["cond_stage"],
                                           out.pop("tokens"))
  return out


def make_loss_fn(model: ldm_lib.LatentDiffusion, config):
  """Returns loss_fn(params, batch, rng) for `ldm_jax.train.step.make_train_step`."""
  unet, cond_stage = model.unet, model.cond_stage
  key = model.config.diffusion.conditioning_key
  schedule = model.schedule
  drop_prob = float(config.train.cond_drop_prob)
  null = {k: jnp.asarray(v) for k, v in null_inputs(model).items()}
  train_cs = trains_cond_stage(model, config)
  frozen_cs = None if train_cs else model.params.get("cond_stage")

  def conditioning(params, batch, rng) -> ldm_lib.Conditioning:
    b = batch["z"].shape[0]
    drop = jax.random.bernoulli(rng, drop_prob, (b,)) if drop_prob > 0 else None
    cond = ldm_lib.Conditioning(concat=batch.get("concat"))
    if "tokens" in batch:
      tokens = batch["tokens"]
      if drop is not None:
        tokens = jnp.where(drop[:, None], null["tokens"][None], tokens)  # [B, L]
      cond.context = cond_stage.apply(params["cond_stage"], tokens)
    elif "context" in batch:
      context = batch["context"]
      if drop is not None:
        empty = cond_stage.apply(frozen_cs, null["tokens"][None])  # [1, L, D]
        context = jnp.where(drop[:, None, None], empty.astype(context.dtype), context)
      cond.context = context
    elif "label" in batch:
      labels = batch["label"]
      if drop is not None:
        labels = jnp.where(drop, null["label"], labels)
      if key == "adm":
        cond.y = labels
      else:
        variables = params["cond_stage"] if train_cs else frozen_cs
        cond.context = cond_stage.apply(variables, labels)  # [B, 1, D]
    return cond

  def loss_fn(params, batch, rng):
    rng_drop, rng_loss, rng_dropout = jax.random.split(rng, 3)
    cond = conditioning(params, batch, rng_drop)

    def denoise(z_t, t, c):
      return ldm_lib.denoise_fn(unet, params["unet"], key, z_t, t, c, deterministic=False,
                                rngs={"dropout": rng_dropout})

    return objectives.diffusion_loss(
        denoise, batch["z"].astype(jnp.float32), cond, rng_loss, schedule,
        parameterization=model.config.diffusion.parameterization,
        loss_type=config.train.loss_type, logvar=params.get("logvar"),
        l_simple_weight=config.train.l_simple_weight,
        original_elbo_weight=config.train.original_elbo_weight,
        min_snr_gamma=config.train.min_snr_gamma or None)

  return loss_fn


def apply_trained(model: ldm_lib.LatentDiffusion, trained: Mapping[str, Any]
                  ) -> ldm_lib.LatentDiffusion:
  """A LatentDiffusion whose UNet (and joint text transformer) use the given trained params."""
  params = dict(model.params)
  params.update({k: v for k, v in trained.items() if k in ("unet", "cond_stage")})
  new = ldm_lib.LatentDiffusion(model.config, params, compute_dtype=model.compute_dtype,
                                tokenizer=model._tokenizer)
  return new


def estimate_scale_factor(model: ldm_lib.LatentDiffusion, images: np.ndarray,
                          rng: jax.Array) -> float:
  """scale_by_std: 1 / std of the unscaled latents of the first batch (as CompVis does once)."""
  z = ldm_lib.encode_fn(model.first_stage, model.params["first_stage"], jnp.asarray(images), rng,
                        1.0)
  return float(1.0 / jnp.std(z))


