"""Translates an original CompVis / Stable Diffusion YAML config into our plain model-config dict.

The YAML (`model.target` LatentDiffusion with `params.{unet_config, first_stage_config,
cond_stage_config}.{target, params}`) is read with PyYAML, no omegaconf. The result is the model
config that `ldm_jax.models.build` consumes (the lead wraps it in a ConfigDict):

  first_stage: {kind: 'kl' | 'vq', kwargs: {ddconfig fields, embed_dim[, n_embed]}}
  unet:        {UNetModel fields}
  cond_stage:  {kind, kwargs, tokenizer: {kind, path} (text encoders only), trainable}
  diffusion:   {timesteps, linear_start, linear_end, beta_schedule, parameterization,
                conditioning_key, scale_factor, scale_by_std, first_stage_key, cond_stage_key,
                image_size, channels, ...}

Defaults are the ones the CompVis constructors apply, so a field left out of the YAML still gets the
value the original model was built with. Fields that only steer training bookkeeping (monitor,
ckpt_path, use_checkpoint, ...) are dropped; any field we do not know raises, naming its YAML path,
because silently ignoring it could build a different network. Text encoders are named in the YAML
(`version: openai/clip-vit-large-patch14`, `arch: ViT-H-14`); their architecture comes from
`TEXT_MODELS` or, for other names, from a local `config.json` directory (`text_config_dir`).
"""

import json
import os
from typing import Any, Mapping

import yaml

from ldm_jax import family
from ldm_jax.models import conditioning
from ldm_jax.errors import ConfigError


class CompVisConfigError(ConfigError):
  """The YAML cannot be translated; the message names the YAML path and the offending value."""


# CLIPTextEncoder kwargs of the text towers the released models name (heads = width / 64).
_CLIP_BASE = dict(vocab_size=49408, max_length=77, epsilon=1e-5)
TEXT_MODELS: dict[str, dict[str, Any]] = {
    # HF transformers names (FrozenCLIPEmbedder `version`): OpenAI CLIP uses quick_gelu.
    "openai/clip-vit-large-patch14": dict(_CLIP_BASE, width=768, layers=12, heads=12,
                                          mlp_dim=3072, activation="quick_gelu"),
    "openai/clip-vit-large-patch14-336": dict(_CLIP_BASE, width=768, layers=12, heads=12,
                                              mlp_dim=3072, activation="quick_gelu"),
    "openai/clip-vit-base-patch32": dict(_CLIP_BASE, width=512, layers=12, heads=8, mlp_dim=2048,
                                         activation="quick_gelu"),
    "openai/clip-vit-base-patch16": dict(_CLIP_BASE, width=512, layers=12, heads=8, mlp_dim=2048,
                                         activation="quick_gelu"),
    # OpenCLIP architecture names (FrozenOpenCLIPEmbedder `arch`): LAION towers use exact GELU.
    "ViT-H-14": dict(_CLIP_BASE, width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu"),
    "ViT-bigG-14": dict(_CLIP_BASE, width=1280, layers=32, heads=20, mlp_dim=5120,
                        activation="gelu"),
}

_ENCODERS = "ldm.modules.encoders.modules."
# Model params that steer training or logging only: they do not change the network or sampling.
_IGNORED_MODEL_PARAMS = {
    "monitor", "log_every_t", "ckpt_path", "ignore_keys", "load_only_unet", "scheduler_config",
    "clip_denoised", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
    "cond_stage_forward", "finetune_keys", "keep_finetune_dims", "c_concat_log_start",
    "c_concat_log_end", "use_positional_encodings", "concat_mode", "force_null_conditioning",
    "unet_config", "first_stage_config", "cond_stage_config", "concat_keys", "masked_image_key",
    "low_scale_config", "low_scale_key", "noise_level_key", "depth_stage_config",
}
_DIFFUSION_DEFAULTS = dict(  # DDPM / LatentDiffusion constructor defaults
    timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
    given_betas=None, parameterization="eps", loss_type="l2", l_simple_weight=1.0,
    original_elbo_weight=0.0, v_posterior=0.0, learn_logvar=False, logvar_init=0.0,
    use_ema=True, first_stage_key="image", cond_stage_key="image", image_size=256, channels=3,
    num_timesteps_cond=None, cond_stage_trainable=False, scale_by_std=False)
_MODEL_TARGETS = {"ldm.models.diffusion.ddpm.LatentDiffusion": "LatentDiffusion",
                  "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": family.INPAINT_TARGET,
                  "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion": family.UPSCALE_TARGET,
                  "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion": family.DEPTH_TARGET}
_LOW_SCALE_TARGET = "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation"
# AbstractLowScaleModel.register_schedule defaults, and the noise augmentation's max level.
_LOW_SCALE_DEFAULTS = dict(beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                           linear_end=2e-2, cosine_s=8e-3)
_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_UNET_DEFAULTS = dict(  # openaimodel.UNetModel defaults, for the fields our UNetModel takes
    dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_classes=None,
    adm_in_channels=None, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=False, resblock_updown=False, use_spatial_transformer=False,
    transformer_depth=1, context_dim=None, use_linear_in_transformer=False,
    disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
    legacy=True)
_UNET_REQUIRED = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                  "attention_resolutions")
# Accepted but without effect on the network (memory / precision switches, unused image_size).
_UNET_IGNORED = {"image_size", "use_checkpoint", "use_fp16", "use_bf16"}
_DD_DEFAULTS = dict(ch_mult=(1, 2, 4, 8), dropout=0.0, resamp_with_conv=True, double_z=None,
                    attn_type="vanilla", tanh_out=False)
_DD_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels",
                "resolution", "z_channels")
_FIRST_STAGES = {"ldm.models.autoencoder.AutoencoderKL": "kl",
                 "ldm.models.autoencoder.VQModel": "vq",
                 "ldm.models.autoencoder.VQModelInterface": "vq"}
_AE_IGNORED = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels",
               "monitor", "batch_resize_range", "scheduler_config", "lr_g_factor",
               "sane_index_shape", "use_ema"}


def _plain(value):
  """YAML lists -> tuples (hashable, as the modules expect), recursively."""
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def _number(value, where: str, kind=float):
  # PyYAML reads `1e-4` (no dot) as a string, unlike omegaconf: accept it as a number.
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      raise CompVisConfigError(f"{where}={value!r}; expected a number") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise CompVisConfigError(f"{where}={value!r}; expected a number")
  if kind is int:
    if float(value) != int(value):
      raise CompVisConfigError(f"{where}={value!r}; expected an integer")
    return int(value)
  return float(value)


def _mapping(value, where: str) -> dict:
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise CompVisConfigError(f"{where} is a {type(value).__name__}; expected a mapping")
  return dict(value)


def _target(node, where: str) -> tuple[str, dict]:
  node = _mapping(node, where)
  if "target" not in node:
    raise CompVisConfigError(f"{where}.target is missing; expected a class path")
  return node["target"], _mapping(node.get("params"), f"{where}.params")


def _take(params: dict, defaults: Mapping, required, ignored, where: str) -> dict:
  """Fills defaults, checks required keys and rejects unknown ones."""
  unknown = sorted(set(params) - set(defaults) - set(required) - set(ignored))
  if unknown:
    raise CompVisConfigError(f"{where}: unknown fields {unknown}; expected only "
                             f"{sorted(set(defaults) | set(required))} (or ignorable "
                             f"{sorted(ignored)})")
  missing = [k for k in required if params.get(k) is None]
  if missing:
    raise CompVisConfigError(f"{where}: required fields {missing} are missing")
  out = {k: _plain(params[k]) for k in required}
  out.update({k: _plain(params.get(k, d)) for k, d in defaults.items()})
  return out


# ---------------------------------------------------------------------------------------------------
# Sub-models
# ---------------------------------------------------------------------------------------------------

def _unet(node, where: str) -> dict:
  target, params = _target(node, where)
  if target != _UNET_TARGET:
    raise CompVisConfigError(f"{where}.target={target!r} is not supported; expected {_UNET_TARGET}")
  where += ".params"
  # Fields of the original UNet that our UNet fixes: accepted only at the value we implement.
  for field, ok in (("dims", 2), ("use_new_attention_order", False), ("n_embed", None)):
    value = params.pop(field, ok)
    if value != ok:
      raise CompVisConfigError(f"{where}.{field}={value!r} is not supported; expected {ok!r}")
  kw = _take(params, _UNET_DEFAULTS, _UNET_REQUIRED, _UNET_IGNORED, where)
  for f in ("in_channels", "model_channels", "out_channels", "num_heads", "num_head_channels",
            "num_heads_upsample"):
    kw[f] = _number(kw[f], f"{where}.{f}", int)
  if kw["num_heads"] == -1 and kw["num_head_channels"] == -1:
    raise CompVisConfigError(f"{where}: num_heads and num_head_channels are both -1; set one")
  if kw["use_spatial_transformer"] and kw["context_dim"] is None:
    raise CompVisConfigError(f"{where}.context_dim is missing; use_spatial_transformer needs it")
  return kw


def first_stage_config(node, where: str) -> dict:
  """A CompVis first-stage YAML node (AutoencoderKL / VQModel / VQModelInterface) -> our kwargs.

  `where` is the node's path in the YAML, used in error messages.
  """
  target, params = _target(node, where)
  if target not in _FIRST_STAGES:
    raise CompVisConfigError(f"{where}.target={target!r} is not supported; expected one of "
                             f"{sorted(_FIRST_STAGES)}")
  kind, where = _FIRST_STAGES[target], where + ".params"
  if params.get("remap") is not None:
    raise CompVisConfigError(f"{where}.remap={params['remap']!r} (codebook index remapping) is not "
                             "supported; expected null")
  params.pop("remap", None)
  top = _take(params, {}, ("ddconfig", "embed_dim") + (("n_embed",) if kind == "vq" else ()),
              _AE_IGNORED, where)
  dd = _mapping(top.pop("ddconfig"), where + ".ddconfig")
  if dd.pop("use_linear_attn", False):
    dd["attn_type"] = "linear"
  if dd.pop("give_pre_end", False):
    raise CompVisConfigError(f"{where}.ddconfig.give_pre_end=True is not supported; expected False")
  kw = _take(dd, _DD_DEFAULTS, _DD_REQUIRED, {"use_timestep"}, where + ".ddconfig")
  if kw["attn_type"] not in ("vanilla", "vanilla-xformers", "none"):
    raise CompVisConfigError(f"{where}.ddconfig.attn_type={kw['attn_type']!r}; expected "
                             "'vanilla', 'vanilla-xformers' or 'none'")
  if kw["attn_type"] == "vanilla-xformers":
    kw["attn_type"] = "vanilla"  # the same function, computed by a different kernel
  if kind == "kl" and kw["double_z"] is False:
    raise CompVisConfigError(f"{where}.ddconfig.double_z=False; AutoencoderKL requires True")
  kw.update(embed_dim=_number(top["embed_dim"], f"{where}.embed_dim", int))
  if kind == "vq":
    kw["n_embed"] = _number(top["n_embed"], f"{where}.n_embed", int)
  return dict(kind=kind, kwargs=kw)


def _text_arch(name: str, where: str, text_config_dir: str | None) -> dict:
  """Architecture kwargs of a named text tower: the table, else a local config directory."""
  folder = text_config_dir or (name if os.path.isdir(str(name)) else None)
  if folder is None:
    if name not in TEXT_MODELS:
      raise CompVisConfigError(
          f"{where}={name!r} is not a known text model (known: {sorted(TEXT_MODELS)}); nothing is "
          "downloaded, so point `version` (or text_config_dir=) at a local directory holding its "
          "config.json")
    return dict(TEXT_MODELS[name])
  path = os.path.join(folder, "config.json")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise CompVisConfigError(f"{where}: cannot read the text model config {path} ({e})") from None
  if "model_cfg" in cfg or "text_cfg" in cfg:  # OpenCLIP config: {model_cfg: {text_cfg: ...}}
    t = cfg.get("model_cfg", cfg)["text_cfg"]
    width = t["width"]
    return dict(vocab_size=t.get("vocab_size", 49408), max_length=t.get("context_length", 77),
                width=width, layers=t["layers"], heads=t.get("heads", width // 64),
                mlp_dim=int(width * t.get("mlp_ratio", 4.0)), epsilon=1e-5,
                activation="quick_gelu" if cfg.get("quick_gelu") else "gelu")
  t = cfg.get("text_config", cfg)  # HF CLIPConfig or CLIPTextConfig
  return dict(vocab_size=t.get("vocab_size", 49408), max_length=t.get("max_position_embeddings", 77),
              width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12),
              heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
              activation=t.get("hidden_act", "quick_gelu"), epsilon=t.get("layer_norm_eps", 1e-5))


def _cond_stage(node, where: str, trainable: bool, text_config_dir: str | None) -> dict:
  if node in ("__is_unconditional__", "__is_first_stage__"):
    return dict(kind="none" if node == "__is_unconditional__" else "first_stage", kwargs={},
                trainable=False)
  target, params = _target(node, where)
  name, pw = target.rsplit(".", 1)[-1], where + ".params"
  out = dict(trainable=bool(trainable))
  if target in ("torch.nn.Identity", _ENCODERS + "IdentityEncoder"):
    out.update(kind="identity", kwargs={})
    params = {}
  elif target == _ENCODERS + "ClassEmbedder":
    kw = _take(params, dict(n_classes=1000, ucg_rate=0.0), ("embed_dim",), {"key"}, pw)
    out.update(kind="class", kwargs=kw, key=params.get("key", "class"))
  elif target in (_ENCODERS + "BERTEmbedder", _ENCODERS + "TransformerEmbedder"):
    # TransformerEmbedder is BERTEmbedder without the tokenizer; both wrap the same x-transformers
    # Encoder, whose heads (8) and head size (64) are fixed by the ldm code, not the YAML.
    defaults = dict(vocab_size=30522, max_seq_len=77, embedding_dropout=0.0,
                    use_tokenizer=name == "BERTEmbedder")
    kw = _take(params, defaults, ("n_embed", "n_layer"), {"device"}, pw)
    if name == "TransformerEmbedder" and kw["use_tokenizer"]:
      raise CompVisConfigError(f"{pw}.use_tokenizer is not a TransformerEmbedder field")
    out.update(kind="ldm_bert", kwargs=dict(
        vocab_size=_number(kw["vocab_size"], f"{pw}.vocab_size", int),
        max_length=_number(kw["max_seq_len"], f"{pw}.max_seq_len", int),
        width=_number(kw["n_embed"], f"{pw}.n_embed", int),
        depth=_number(kw["n_layer"], f"{pw}.n_layer", int),
        heads=8, head_dim=64, mlp_ratio=4, epsilon=1e-5),
        # Without the tokenizer the cond stage is fed token ids directly (layout2img box tokens).
        tokenizer=dict(kind="bert" if kw["use_tokenizer"] else None, path=None))
  elif target == _ENCODERS + "FrozenCLIPEmbedder":
    kw = _take(params, dict(version="openai/clip-vit-large-patch14", max_length=77, layer="last",
                            layer_idx=None), (), {"device", "freeze"}, pw)
    # 'hidden' (an inner layer without the final LayerNorm) and 'pooled' feed other outputs.
    if kw["layer"] != "last":
      raise CompVisConfigError(f"{pw}.layer={kw['layer']!r} is not supported; expected 'last'")
    arch = _text_arch(kw["version"], pw + ".version", text_config_dir)
    out.update(kind="clip", version=kw["version"], tokenizer=dict(kind="clip", path=None),
               kwargs=dict(arch, max_length=_number(kw["max_length"], f"{pw}.max_length", int),
                           output_layer=kw["layer"]))
  elif target == _ENCODERS + "FrozenOpenCLIPEmbedder":
    kw = _take(params, dict(arch="ViT-H-14", version="laion2b_s32b_b79k", max_length=77,
                            layer="last"), (), {"device", "freeze"}, pw)
    if kw["layer"] not in ("last", "penultimate"):
      raise CompVisConfigError(f"{pw}.layer={kw['layer']!r}; expected 'last' or 'penultimate'")
    arch = _text_arch(kw["arch"], pw + ".arch", text_config_dir)
    out.update(kind="openclip", arch=kw["arch"], version=kw["version"],
               tokenizer=dict(kind="openclip", path=None),
               kwargs=dict(arch, max_length=_number(kw["max_length"], f"{pw}.max_length", int),
                           output_layer=kw["layer"]))
  elif target == _ENCODERS + "SpatialRescaler":
    kw = _take(params, dict(n_stages=1, method="bilinear", multiplier=0.5, in_channels=3,
                            out_channels=None, bias=False), (), (), pw)
    out.update(kind="spatial_rescaler", kwargs=kw)
  else:
    raise CompVisConfigError(
        f"{where}.target={target!r} is not supported; expected __is_unconditional__, "
        "__is_first_stage__, torch.nn.Identity or ldm.modules.encoders.modules.{ClassEmbedder, "
        "BERTEmbedder, TransformerEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, "
        "SpatialRescaler}")
  out["kwargs"] = out.get("kwargs", {})
  return out


# ---------------------------------------------------------------------------------------------------
# The LatentDiffusion wrapper
# ---------------------------------------------------------------------------------------------------

def _low_scale(node, where: str) -> dict:
  """The x4 upscaler's `low_scale_config` -> {beta_schedule, timesteps, linear_start, linear_end,
  max_noise_level}: how its low-resolution input is noised."""
  target, params = _target(node, where)
  if target != _LOW_SCALE_TARGET:
    raise CompVisConfigError(f"{where}.target={target!r}; expected {_LOW_SCALE_TARGET}")
  params = _take(params, dict(noise_schedule_config={}, max_noise_level=1000), (), (), where)
  sched = _take(_mapping(params["noise_schedule_config"], f"{where}.noise_schedule_config"),
                _LOW_SCALE_DEFAULTS, (), (), f"{where}.noise_schedule_config")
  if sched["beta_schedule"] not in ("linear", "sqrt_linear", "cosine", "sqrt"):
    raise CompVisConfigError(f"{where}.noise_schedule_config.beta_schedule="
                             f"{sched['beta_schedule']!r}; expected linear, sqrt_linear, cosine "
                             f"or sqrt")
  out = dict(beta_schedule=sched["beta_schedule"],
             timesteps=_number(sched["timesteps"], f"{where}.timesteps", int),
             max_noise_level=_number(params["max_noise_level"], f"{where}.max_noise_level", int))
  for f in ("linear_start", "linear_end"):
    out[f] = _number(sched[f], f"{where}.noise_schedule_config.{f}")
  return out


def translate_compvis_config(config: Mapping[str, Any], *, source: str = "<config>",
                             text_config_dir: str | None = None) -> dict[str, Any]:
  """An original YAML (already parsed into dicts) -> {first_stage, unet, cond_stage, diffusion}.

  `source` (the file name) prefixes every error. `text_config_dir` overrides where the text
  encoder's architecture comes from (a directory with an HF or OpenCLIP config.json).
  """
  def where(path):
    return f"{source}: {path}"

  model = _mapping(_mapping(config, where("<root>")).get("model"), where("model"))
  target = model.get("target")
  if target not in _MODEL_TARGETS:
    raise CompVisConfigError(f"{where('model.target')}={target!r} is not supported; expected one "
                             f"of {sorted(_MODEL_TARGETS)}")
  params = _mapping(model.get("params"), where("model.params"))
  for key in ("unet_config", "first_stage_config", "cond_stage_config"):
    if key not in params:
      raise CompVisConfigError(f"{where('model.params.' + key)} is missing")
  p = where("model.params")
  diffusion = _take({k: v for k, v in params.items() if k not in _IGNORED_MODEL_PARAMS},
                    dict(_DIFFUSION_DEFAULTS, conditioning_key=None, scale_factor=1.0), (),
                    _IGNORED_MODEL_PARAMS, p)
  for f in ("linear_start", "linear_end", "cosine_s", "scale_factor", "l_simple_weight",
            "original_elbo_weight", "v_posterior", "logvar_init"):
    diffusion[f] = _number(diffusion[f], f"{p}.{f}")
  for f in ("timesteps", "image_size", "channels"):
    diffusion[f] = _number(diffusion[f], f"{p}.{f}", int)
  if diffusion["beta_schedule"] not in ("linear", "sqrt_linear", "cosine", "sqrt"):
    raise CompVisConfigError(f"{p}.beta_schedule={diffusion['beta_schedule']!r}; expected linear, "
                             "sqrt_linear, cosine or sqrt")
  if diffusion["parameterization"] not in ("eps", "x0", "v"):
    raise CompVisConfigError(f"{p}.parameterization={diffusion['parameterization']!r}; expected "
                             "'eps', 'x0' or 'v'")
  # LatentDiffusion.__init__: no conditioning_key means concat (concat_mode defaults to True) or
  # cross-attention; an unconditional cond stage forces None.
  cond_node = params["cond_stage_config"]
  key = diffusion["conditioning_key"]
  if key is None:
    key = "concat" if params.get("concat_mode", True) else "crossattn"
  if cond_node == "__is_unconditional__" and not params.get("force_null_conditioning", False):
    key = None
  if key not in conditioning.CONDITIONING_KEYS:
    raise CompVisConfigError(f"{p}.conditioning_key={key!r}; expected null, concat, crossattn, "
                             "hybrid, adm or hybrid-adm")
  diffusion["conditioning_key"] = key
  if diffusion["num_timesteps_cond"] is None:
    diffusion["num_timesteps_cond"] = 1
  # scale_by_std models compute 1/std(z) during training and keep it only as a checkpoint buffer.
  if diffusion["scale_by_std"]:
    diffusion["scale_factor"] = None
  diffusion["model_target"] = _MODEL_TARGETS[target]
  if diffusion["model_target"] == family.INPAINT_TARGET:
    diffusion["concat_keys"] = _plain(params.get("concat_keys", family.INPAINT_CONCAT_KEYS))
    diffusion["masked_image_key"] = params.get("masked_image_key", "masked_image")
  if diffusion["model_target"] == family.DEPTH_TARGET:
    # get_input normalises the resized depth with + 0.001 in the denominator. The MiDaS estimator
    # (depth_stage_config) is not imported: the user supplies the depth map.
    diffusion["depth_eps"] = 0.001
  if diffusion["model_target"] == family.UPSCALE_TARGET:
    diffusion["low_scale"] = _low_scale(params.get("low_scale_config"),
                                        f"{p}.low_scale_config")
  return dict(
      first_stage=first_stage_config(params["first_stage_config"], f"{p}.first_stage_config"),
      unet=_unet(params["unet_config"], f"{p}.unet_config"),
      cond_stage=_cond_stage(cond_node, f"{p}.cond_stage_config",
                             diffusion.pop("cond_stage_trainable"), text_config_dir),
      diffusion=diffusion)


def load_compvis_config(path, *, text_config_dir: str | None = None) -> dict[str, Any]:
  """Reads an original YAML file with PyYAML and translates it (see translate_compvis_config)."""
  try:
    with open(path) as f:
      config = yaml.safe_load(f)
  except OSError as e:
    raise CompVisConfigError(f"{path}: cannot read the YAML config ({e.strerror})") from None
  except yaml.YAMLError as e:
    raise CompVisConfigError(f"{path}: not valid YAML ({e})") from None
  return translate_compvis_config(config, source=str(path), text_config_dir=text_config_dir)
