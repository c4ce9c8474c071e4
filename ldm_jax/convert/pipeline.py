"""Whole-model import: an original CompVis / Stable Diffusion checkpoint + YAML, or a diffusers folder.

Each returns (model config, params) for `LatentDiffusion`; every component goes through its strict
importer, so a missing, unexpected or mis-shaped tensor anywhere raises `WeightLoadError`.
"""

from typing import Any, Mapping

import ml_collections
import numpy as np

from ldm_jax import family
from ldm_jax.convert import autoencoder as ae_convert
from ldm_jax.convert import compvis_config
from ldm_jax.convert import text as text_convert
from ldm_jax.convert import torch_io
from ldm_jax.convert import unet as unet_convert
from ldm_jax.convert.checkpoint_limits import guard
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.models import build

# Keys of the translated diffusion section that LatentDiffusion does not use for sampling.
_TRAINING_ONLY = ("given_betas", "loss_type", "l_simple_weight", "original_elbo_weight",
                  "v_posterior", "learn_logvar", "logvar_init", "use_ema", "num_timesteps_cond",
                  "model_target")

# The guidance scale the original front ends default to, by text encoder: Stable Diffusion's
# txt2img script and the diffusers pipelines 7.5 (CLIP / OpenCLIP), CompVis's LDM txt2img script
# 5.0 (its BERT). Other models keep the library default (no guidance).
RECOMMENDED_GUIDANCE = {"clip": 7.5, "openclip": 7.5, "ldm_bert": 5.0, "bert": 5.0}


def recommended_sampling(cond_kind: str) -> dict[str, Any]:
  """The `sampling` section of an imported model's config (LatentDiffusion.sampling_settings)."""
  if cond_kind in RECOMMENDED_GUIDANCE:
    return {"sampler": "ddim", "steps": 50, "guidance": RECOMMENDED_GUIDANCE[cond_kind]}
  return {}


def _first_stage_as_cond(sd: Mapping[str, Any], first_stage_sd: Mapping[str, Any]) -> dict:
  """`__is_first_stage__`: CompVis sets cond_stage_model = first_stage_model, so the checkpoint
  holds the first stage's tensors twice. They must be that copy; the model reads the first stage."""
  if not sd:
    return {}
  if set(sd) != set(first_stage_sd):
    extra = sorted(set(sd) - set(first_stage_sd))[:3]
    missing = sorted(set(first_stage_sd) - set(sd))[:3]
    raise WeightLoadError(f"cond_stage '__is_first_stage__': the cond_stage_model tensors should "
                          f"repeat first_stage_model's; extra {extra}, missing {missing}.")
  for k in sorted(sd):
    if not np.array_equal(np.asarray(sd[k]), np.asarray(first_stage_sd[k])):
      raise WeightLoadError(f"cond_stage '__is_first_stage__': cond_stage_model.{k} differs from "
                            f"first_stage_model.{k}; expected the same tensor.")
  return {}


def _cond_params(kind: str, sd: Mapping[str, Any], module):
  if kind in ("none", "identity"):
    if sd:
      raise WeightLoadError(f"cond_stage kind {kind!r} has no weights, but the checkpoint has "
                            f"{len(sd)} cond_stage_model tensors, e.g. {sorted(sd)[:3]}.")
    return {}
  if kind == "class":
    return {"params": text_convert.class_embedder_from_compvis(sd, module)}
  if kind == "spatial_rescaler":
    return {"params": text_convert.spatial_rescaler_from_compvis(sd, module)}
  if kind == "ldm_bert":
    return {"params": text_convert.ldm_text_from_compvis(sd, module)}
  if kind == "clip":
    return {"params": text_convert.clip_from_hf(sd, module)}
  if kind == "openclip":
    return {"params": text_convert.clip_from_openclip(sd, module)}
  if kind == "bert":
    return {"params": text_convert.bert_from_hf(sd, module)}
  raise WeightLoadError(f"no importer for cond_stage kind {kind!r}.")


def load_compvis(ckpt_path: str, yaml_path: str, *, use_ema: bool | None = None,
                 tokenizer_path: str | None = None, text_config_dir: str | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """An original LatentDiffusion `.ckpt`/`.safetensors` with its YAML -> (config, params).

  use_ema: True takes the `model_ema.*` UNet weights (an error if there are none), False the raw
  ones; None (default) takes the EMA weights when the checkpoint has them (pruned "ema-only" files
  already hold EMA weights as the raw ones).
  """
  cfg = compvis_config.load_compvis_config(yaml_path, text_config_dir=text_config_dir)
  sd = torch_io.load_state_dict(ckpt_path)
  if use_ema is None:
    use_ema = any(k.startswith("model_ema.") and not k.endswith(("decay", "num_updates"))
                  for k in sd)
  with guard(ckpt_path):  # its errors (EMA copies, scale_factor) name the file too
    parts = torch_io.split_compvis_state_dict(sd, use_ema=use_ema)
  diffusion = {k: v for k, v in cfg["diffusion"].items() if k not in _TRAINING_ONLY}
  if cfg["diffusion"].get("model_target") in (family.INPAINT_TARGET, family.UPSCALE_TARGET,
                                               family.DEPTH_TARGET):
    diffusion["model_target"] = cfg["diffusion"]["model_target"]  # Routes their condition.
  if diffusion.get("scale_by_std") or diffusion.get("scale_factor") is None:
    if parts["scale_factor"] is None:
      if diffusion.get("scale_by_std"):
        raise WeightLoadError(f"{ckpt_path}: the YAML says scale_by_std, but the checkpoint has no "
                              f"'scale_factor' buffer.")
      diffusion["scale_factor"] = 1.0
    else:
      diffusion["scale_factor"] = parts["scale_factor"]
  cond = dict(cfg["cond_stage"])
  if tokenizer_path and "tokenizer" in cond:
    cond["tokenizer"] = dict(cond["tokenizer"], path=tokenizer_path)
  config = ml_collections.ConfigDict(dict(
      first_stage=cfg["first_stage"], unet=cfg["unet"], cond_stage=cond, diffusion=diffusion,
      sampling=recommended_sampling(cond.get("kind", "none"))))
  fs = build.build_first_stage(config.first_stage)
  unet = build.build_unet(config.unet)
  cs = build.build_cond_stage(cond)
  params = {
      "first_stage": {"params": ae_convert.autoencoder_from_compvis(parts["first_stage"], fs)},
      "unet": {"params": unet_convert.unet_from_compvis(parts["unet"], unet)},
      "cond_stage": (_first_stage_as_cond(parts["cond_stage"], parts["first_stage"])
                     if cond.get("kind") == "first_stage" else
                     _cond_params(cond.get("kind", "none"), parts["cond_stage"], cs)),
  }
  return config, params


# diffusers' beta_schedule names -> ours (CompVis's): "scaled_linear" is CompVis "linear".
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear",
                   "squaredcos_cap_v2": "cosine"}


def _beta_schedule(sched: Mapping[str, Any], where: str) -> str:
  kind = sched.get("beta_schedule", "scaled_linear")
  if kind not in _BETA_SCHEDULES:
    raise ValueError(f"{where}: beta_schedule={kind!r}; expected one of "
                     f"{sorted(_BETA_SCHEDULES)}.")
  return _BETA_SCHEDULES[kind]


def _scheduler_to_diffusion(sched: Mapping[str, Any], vae_cfg: Mapping[str, Any],
                            unet_cfg: Mapping[str, Any], context_dim, *,
                            low_res_sched: Mapping[str, Any] | None = None,
                            max_noise_level: int | None = None) -> dict[str, Any]:
  """scheduler_config.json + vae/unet config.json -> the diffusion section of our config.

  `unet_cfg` is the diffusers UNet config.json; `context_dim` comes from our converted UNet kwargs
  (diffusers calls it cross_attention_dim), and decides the cross-attention routing. The UNet's
  extra input channels name the model: 2C + 1 with text = inpainting (StableDiffusionInpaint), C + 1
  with text = depth-to-image (StableDiffusionDepth2Img), C + 3
  with text and class labels = the x4 upscaler (StableDiffusionUpscale, whose `low_res_sched`
  and `max_noise_level` describe its input's noise), C + 3 without text = LDM super-resolution.
  """
  kind = _beta_schedule(sched, "scheduler_config.json")
  prediction = sched.get("prediction_type", "epsilon")
  params = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
  if prediction not in params:
    raise ValueError(f"scheduler_config.json: prediction_type={prediction!r}; expected one of "
                     f"{sorted(params)}.")
  latent = int(vae_cfg.get("latent_channels", 4))
  in_channels = int(unet_cfg.get("in_channels", latent))
  extra = {}
  key = "crossattn" if context_dim else None
  if in_channels == 2 * latent + 1 and context_dim:
    # StableDiffusionInpaintPipeline's UNet: z_t, the hole mask and the masked image's latents.
    key = "hybrid"
    extra = dict(model_target=family.INPAINT_TARGET,
                 concat_keys=list(family.INPAINT_CONCAT_KEYS), masked_image_key="masked_image")
  elif in_channels == latent + 1 and context_dim:
    # StableDiffusionDepth2ImgPipeline: one depth channel, normalised without an epsilon.
    key = "hybrid"
    extra = dict(model_target=family.DEPTH_TARGET, depth_eps=0.0)
  elif in_channels == latent + 3 and context_dim and unet_cfg.get("num_class_embeds"):
    key = "hybrid-adm"
    low = dict(low_res_sched or {})
    extra = dict(model_target=family.UPSCALE_TARGET, low_scale=dict(
        beta_schedule=_beta_schedule(low, "low_res_scheduler/scheduler_config.json"),
        timesteps=int(low.get("num_train_timesteps", 1000)),
        linear_start=float(low.get("beta_start", 1e-4)),
        linear_end=float(low.get("beta_end", 2e-2)),
        max_noise_level=int(350 if max_noise_level is None else max_noise_level)))
  elif in_channels == latent + 3 and not context_dim:
    key = "concat"  # LDMSuperResolutionPipeline: the low-resolution image itself.
  elif in_channels != latent:
    raise ValueError(f"unet/config.json: in_channels={in_channels} with a VAE of {latent} latent "
                     f"channels; expected {latent} (text-to-image), {2 * latent + 1} with "
                     f"cross-attention (inpainting), {latent + 1} (depth) or {latent + 3} "
                     f"(super-resolution).")
  return dict(extra,timesteps=int(sched.get("num_train_timesteps", 1000)),
              beta_schedule=kind,
              linear_start=float(sched.get("beta_start", 0.00085)),
              linear_end=float(sched.get("beta_end", 0.012)), cosine_s=8e-3,
              zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
              parameterization=params[prediction], conditioning_key=key,
              scale_factor=float(vae_cfg.get("scaling_factor", 0.18215)), scale_by_std=False,
              image_size=int(unet_cfg.get("sample_size", 64) or 64), channels=latent)


def load_diffusers(folder: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """A diffusers pipeline folder (unet/, vae/, text_encoder/, scheduler/, tokenizer/)."""
  parts = torch_io.read_diffusers_folder(folder)
  if "vae" not in parts and "vqvae" in parts:
    # The LDM pipelines' name for it; they never scale latents, whatever VQModel's config says.
    parts["vae"] = (dict(parts["vqvae"][0], scaling_factor=1.0), parts["vqvae"][1])
  for name in ("unet", "vae"):
    if name not in parts:
      raise FileNotFoundError(f"{folder}: no {name}/ component; a latent diffusion pipeline needs "
                              f"unet/ and vae/.")
  unet_cfg, unet_sd = parts["unet"]
  vae_cfg, vae_sd = parts["vae"]
  unet_kwargs = unet_convert.unet_kwargs_from_diffusers_config(unet_cfg)
  fs_cls, fs_kwargs = ae_convert.autoencoder_kwargs_from_diffusers_config(vae_cfg)
  fs_kind = "kl" if fs_cls == "AutoencoderKL" else "vq"
  cond: dict[str, Any] = {"kind": "none"}
  if "text_encoder" in parts:
    te_cfg, te_sd = parts["text_encoder"]
    arch = (te_cfg.get("architectures") or [te_cfg.get("_class_name", "")])[0]
    if "CLIP" in arch or te_cfg.get("model_type") == "clip_text_model":
      kind, kwargs = "clip", text_convert.clip_kwargs_from_hf_config(te_cfg)
    elif "LDMBert" in arch or te_cfg.get("model_type") == "ldmbert":
      kind, kwargs = "ldm_bert", text_convert.ldm_text_kwargs_from_diffusers_config(te_cfg)
    elif "Bert" in arch:
      kind, kwargs = "bert", text_convert.bert_kwargs_from_hf_config(te_cfg)
    else:
      raise ValueError(f"{folder}/text_encoder/config.json: unsupported text encoder {arch!r}.")
    tok = parts.get("tokenizer", ({}, {}))[0].get("path", "")
    tok_kind = {"clip": "clip", "ldm_bert": "bert", "bert": "bert"}[kind]
    cond = {"kind": kind, "kwargs": kwargs, "tokenizer": {"kind": tok_kind, "path": tok},
            "trainable": False}
  sched = parts.get("scheduler", ({}, {}))[0]
  config = ml_collections.ConfigDict(dict(
      first_stage={"kind": fs_kind, "kwargs": fs_kwargs},
      unet={k: v for k, v in unet_kwargs.items()},
      cond_stage=cond,
      diffusion=_scheduler_to_diffusion(
          sched, vae_cfg, dict(unet_cfg), unet_kwargs.get("context_dim"),
          low_res_sched=parts.get("low_res_scheduler", ({}, {}))[0],
          max_noise_level=parts.get("model_index", ({}, {}))[0].get("max_noise_level")),
      sampling=recommended_sampling(cond["kind"])))
  fs = build.build_first_stage(config.first_stage)
  unet = build.build_unet(config.unet)
  params = {"first_stage": {"params": ae_convert.autoencoder_from_diffusers(vae_sd, fs)},
            "unet": {"params": unet_convert.unet_from_diffusers(unet_sd, unet)},
            "cond_stage": {}}
  if cond["kind"] != "none":
    cs = build.build_cond_stage(cond)
    te_sd = parts["text_encoder"][1]
    fn = {"clip": text_convert.clip_from_hf, "ldm_bert": text_convert.ldm_text_from_diffusers,
          "bert": text_convert.bert_from_hf}[cond["kind"]]
    params["cond_stage"] = {"params": fn(te_sd, cs)}
  return config, params
