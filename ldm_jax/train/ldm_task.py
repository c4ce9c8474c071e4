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
from ldm_jax.data import annotations
from ldm_jax.data import transforms
from ldm_jax.diffusion import objectives
from ldm_jax.models import conditioning as conditioning_lib

FROZEN_TEXT = ("clip", "openclip", "bert")


def trains_cond_stage(model: ldm_lib.LatentDiffusion, config) -> bool:
  """The paper's text transformer and class embedders train with the UNet; CLIP/BERT stay frozen,
  but run in the step when they carry LoRA adapters (config.lora.targets)."""
  kind = model.cond_kind
  lora = config.get("lora") or {}
  if kind in FROZEN_TEXT and model.cond_stage is not None and lora.get("rank"):
    return "text_encoder" in tuple(lora.get("targets", ()))
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
    return {"label": np.int32(model.null_label)}
  return {}


def is_layout(model: ldm_lib.LatentDiffusion) -> bool:
  """Layout-to-image: a text-style transformer over box tokens, no tokenizer."""
  return model.is_text and not model.cond_stage_config.get("tokenizer", {}).get("kind")


def task_inputs(model: ldm_lib.LatentDiffusion, batch: Mapping[str, Any], config,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Per-family conditioning inputs made on the host from an image batch (this host's shard).

  super-resolution (cond 'identity', concat): the image downsampled to latent size, degraded as
    config.data.degradation says ('bicubic' or 'bsr', `transforms.degrade`);
  inpainting (cond 'first_stage', and Stable Diffusion's text inpainting models): random holes ->
    masked image + keep-mask (pixel resolution);
  the x4 upscaler: its low-resolution input noised as `upscaler_inputs` says;
  depth-to-image: `depth_inputs`;
  layout (box-token transformer): the boxes (those `box_mask` marks real, when the batch has one)
    as tokens, coded as the model's `cond_stage.layout` says;
  semantic synthesis ('spatial_rescaler'): one-hot class maps [B, H, W, classes]: the batch's
    `segmentation` maps, else drawn from shapes boxes (`class_maps`).
  """
  kind, key = model.cond_kind, model.config.diffusion.conditioning_key
  images = np.asarray(batch["image"], np.float32)  # [B, H, W, 3] in [-1, 1]
  out: dict[str, np.ndarray] = {}
  if (kind == "identity" and conditioning_lib.takes_concat(key)) or model.is_upscaler:
    f = model.downsample_factor
    degradation = config.data.get("degradation", transforms.BICUBIC)
    lowres = [transforms.degrade(transforms.to_uint8(im), f, degradation, rng) for im in images]
    out["concat"] = np.stack([transforms.to_float(x) for x in lowres])  # [B, H/f, W/f, 3]
    if model.is_upscaler:
      out["concat"], out["noise_level"] = upscaler_inputs(model, out["concat"], rng)
  elif model.is_depth:
    out["concat"] = depth_inputs(model, images, batch)
  elif kind == "first_stage" or model.is_text_inpainting:
    masker = transforms.InpaintTransform(kind=config.data.inpaint_masks)
    masks = np.stack([masker({"image": im}, rng)["mask"] for im in images])  # [B, H, W, 1]
    out["inpaint_mask"], out["masked_image"] = masks, images * masks
  elif is_layout(model):
    coding = transforms.layout_coding(model.cond_stage_config)
    masks = batch.get("box_mask", [None] * len(images))
    out["tokens"] = np.stack([coding.tokens(b, l, m) for b, l, m in zip(
        batch["boxes"], batch["box_labels"], masks)])  # [B, 3 * max_objects]
  elif kind == "spatial_rescaler":
    channels = int(model.cond_stage_config["kwargs"]["in_channels"])
    if "segmentation" in batch:  # Maps read with the images (a folder's maps/).
      out["seg"] = annotations.one_hot(np.asarray(batch["segmentation"]), channels)
    else:
      out["seg"] = class_maps(images, batch, channels)  # [B, H, W, channels]
  return out


def upscaler_inputs(model: ldm_lib.LatentDiffusion, lowres: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The x4 upscaler's training input, as LatentUpscaleDiffusion makes it: each sample's noise level
  drawn uniformly from [0, max_noise_level), its low-resolution image noised to that level by the
  low-scale schedule. lowres [B, h, w, 3] in [-1, 1] -> (concat [B, h, w, 3], levels [B] int32,
  the class label the UNet embeds)."""
  levels = rng.integers(0, model.max_noise_level, size=len(lowres)).astype(np.int32)
  ls = model.low_scale_schedule
  a = np.asarray(ls.alphas_cumprod, np.float64)[levels][:, None, None, None]  # [B, 1, 1, 1]
  noise = rng.standard_normal(lowres.shape)
  return (np.sqrt(a) * lowres + np.sqrt(1.0 - a) * noise).astype(np.float32), levels


def depth_inputs(model: ldm_lib.LatentDiffusion, images: np.ndarray,
                 batch: Mapping[str, Any]) -> np.ndarray:
  """A depth-to-image model's concat [B, h, w, 1] from the batch's depth maps [B, H, W].

  No depth estimator is bundled: the data must carry `depth`. Built-in shapes images (which carry
  boxes) imply one: flat objects in front (depth 1) of a far background (0).
  """
  if "depth" in batch:
    depth = np.asarray(batch["depth"], np.float32)
  elif "boxes" in batch:
    depth = (images < 0.9).any(-1).astype(np.float32)  # [B, H, W]: not white = an object
  else:
    raise ValueError("a depth-to-image model trains on depth maps, but the batch has no 'depth' "
                     f"(keys: {sorted(batch)}); no depth estimator is bundled, so the data source "
                     "must provide one per image.")
  f = model.downsample_factor
  return model.depth_condition(depth, images.shape[1] // f, images.shape[2] // f)


def class_maps(images: np.ndarray, batch: Mapping[str, Any], channels: int) -> np.ndarray:
  """One-hot semantic maps of shapes images: a pixel belongs to the object whose box holds it
  when it is not white (background, channel 0); object classes are box_labels + 1."""
  b, h, w, _ = images.shape
  labels = np.zeros((b, h, w), np.int64)
  ink = (images < 0.9).any(-1)  # [B, H, W] not white
  ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  for i in range(b):
    for box, lab in zip(np.asarray(batch["boxes"][i]), np.asarray(batch["box_labels"][i])):
      inside = ((ys[:, None] >= box[1]) & (ys[:, None] <= box[3]) &
                (xs[None] >= box[0]) & (xs[None] <= box[2]))
      labels[i][inside & ink[i]] = int(lab) + 1
  return np.eye(channels, dtype=np.float32)[np.minimum(labels, channels - 1)]


def encode_batch(model: ldm_lib.LatentDiffusion, batch: Mapping[str, Any], rng: jax.Array,
                 config, mesh=None) -> dict[str, Any]:
  """Host batch -> the train step's inputs: scaled latents z, and tokens/labels/context/concat.

  Captions are tokenised and task inputs made on the host; every array is then assembled into a
  global batch-sharded array (each host contributes its shard) before the frozen encoders run.
  """
  np_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  if "latents" in batch:  # A latent cache (ldm_jax.data.latent_cache) holds z already scaled.
    local = {"z": np.asarray(batch["latents"], np.float32)}
  else:
    local = {"image": np.asarray(batch["image"], np.float32)}
    local.update(task_inputs(model, batch, config, np_rng))
  if model.is_text and not is_layout(model):
    local["tokens"] = model.tokenize([str(c) for c in batch["caption"]])
  elif model.cond_kind == "class":
    local["label"] = np.asarray(batch["label"], np.int32)
  arrays = (parallel.make_global_batch(local, mesh) if mesh is not None
            else jax.tree.map(jnp.asarray, local))
  out = {k: v for k, v in arrays.items()
         if k not in ("image", "inpaint_mask", "masked_image")}
  if "image" in arrays:
    out["z"] = model.encode(arrays["image"], rng)
  if "masked_image" in arrays:
    if model.is_text_inpainting:  # [hole mask, masked-image latent] in the model's concat_keys order
      out["concat"] = model.inpaint_concat(arrays["masked_image"], arrays["inpaint_mask"])
    else:
      out["concat"] = model.condition(images=arrays["masked_image"],
                                      mask=arrays["inpaint_mask"]).concat
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
  null = ({k: jnp.asarray(v) for k, v in null_inputs(model).items()} if drop_prob > 0 else {})
  train_cs = trains_cond_stage(model, config)
  frozen_cs = None if train_cs else model.params.get("cond_stage")
  # A frozen text encoder's empty-prompt context is the same every step: computed once here, so
  # the step neither reruns the encoder nor carries its weights as constants.
  null_context = (frozen_null_context(model) if drop_prob > 0 and model.is_text and not train_cs
                  else None)

  def conditioning(params, batch, rng) -> ldm_lib.Conditioning:
    b = batch["z"].shape[0]
    drop = jax.random.bernoulli(rng, drop_prob, (b,)) if drop_prob > 0 else None
    # Concat inputs and the upscaler's noise level are kept when the condition is dropped, as
    # CompVis's hybrid models keep them in their unconditional branch.
    cond = ldm_lib.Conditioning(concat=batch.get("concat"), y=batch.get("noise_level"))
    if "seg" in batch:  # Semantic maps through the (trainable) spatial rescaler.
      variables = params["cond_stage"] if train_cs else frozen_cs
      cond.concat = cond_stage.apply(variables, batch["seg"])  # [B, h, w, c]
    if "tokens" in batch:
      tokens = batch["tokens"]
      if drop is not None:
        tokens = jnp.where(drop[:, None], null["tokens"][None], tokens)  # [B, L]
      cond.context = cond_stage.apply(params["cond_stage"], tokens)
    elif "context" in batch:
      context = batch["context"]
      if drop is not None:
        context = jnp.where(drop[:, None, None], null_context.astype(context.dtype), context)
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


def frozen_null_context(model: ldm_lib.LatentDiffusion) -> jax.Array:
  """The frozen text encoder's context for the empty prompt, [1, L, D].

  With abstract parameters (ahead-of-time compilation, `jax.ShapeDtypeStruct` leaves) only its
  shape and dtype can matter, and zeros of them are returned.
  """
  tokens = jnp.asarray(null_inputs(model)["tokens"])[None]  # [1, L]
  encode = jax.jit(lambda variables: ldm_lib.cond_stage_fn(model.cond_stage, variables, tokens))
  variables = model.params["cond_stage"]
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables)):
    out = jax.eval_shape(encode, variables)
    return jnp.zeros(out.shape, out.dtype)
  return encode(variables)


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


