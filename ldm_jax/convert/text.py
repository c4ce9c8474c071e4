"""Importers for the conditioning encoders: torch state dicts -> Flax params, strictly.

Each importer takes a flat {key: array} state dict and the Flax module it loads into, finds where
the encoder's keys start (e.g. `cond_stage_model.transformer.text_model.` in an SD 1.x .ckpt, or no
prefix in a transformers/diffusers save; only keys under that prefix are considered), builds the
parameter template with `jax.eval_shape(model.init, ...)` and fills it with `strict_load`, so any
missing, unexpected or mis-shaped tensor raises one `WeightLoadError` listing them all. They return
the `params` tree: use it as `model.apply({"params": params}, ...)`.

Tensors that are deliberately not loaded (and therefore allowed to be present):
  * `embeddings.position_ids` (a buffer in HF CLIP/BERT saves);
  * `text_projection`, `logit_scale`, `visual.*`, `attn_mask` (OpenCLIP parts outside the text tower
    or not used for per-token features) and HF `text_projection.weight`;
  * `pooler.*` (HF BERT) and `to_logits.*` (LDM text model: the unused language-model head);
  * the final block when `output_layer='penultimate'`: the model never runs it and so does not
    build it, but the importer requires it to be present, so a depth mismatch is still caught.

`*_kwargs_from_hf_config` turn a transformers config.json (as a dict) into module kwargs, using the
transformers defaults for fields a diff-saved config leaves out.
"""

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.common import (Path, WeightLoadError, conv_kernel, dense_kernel, flatten,
                                    identity, strict_load, strip_prefix)
from ldm_jax.models.bert import BertEncoder
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler
from ldm_jax.models.text import CLIPTextEncoder, LDMTextTransformer

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor; bf16 has no numpy dtype, so go through fp32
    v = v.detach().cpu()
    return (v.float() if v.is_floating_point() else v).numpy()
  return np.asarray(v)


def _select(sd: Mapping[str, Any], anchor: str, prefixes: Sequence[str], what: str) -> dict:
  """The sub-dict under the first prefix p with p + anchor in sd, prefix removed, as numpy."""
  for p in prefixes:
    if p + anchor in sd:
      return {k: _to_numpy(v) for k, v in strip_prefix(sd, p).items()}
  sample = sorted(sd)[:8]
  raise WeightLoadError(f"{what}: no {anchor!r} under any of the prefixes {list(prefixes)}; "
                        f"expected one of them (first keys given: {sample}).")


def _check_model(model, cls, what):
  if not isinstance(model, cls):
    raise TypeError(f"{what}: model is a {type(model).__name__}; expected {cls.__name__}.")


def _template(model, *args) -> Params:
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]


def _leaf(module_key: str, leaf: str) -> tuple[str, Callable]:
  """torch key and transform of a Dense/LayerNorm/Embed leaf of the torch module `module_key`."""
  if leaf == "kernel":
    return f"{module_key}.weight", dense_kernel
  if leaf == "scale":
    return f"{module_key}.weight", identity
  if leaf == "bias":
    return f"{module_key}.bias", identity
  raise KeyError(leaf)


def _block_index(name: str) -> int:
  return int(name.split("_")[1])  # "blocks_7" -> 7


def _require_skipped_block(sd, model, block_prefix: str, what: str) -> list[str]:
  """For output_layer='penultimate': the checkpoint must hold the unused last block; returns the
  prefix to ignore for it."""
  if model.output_layer != "penultimate":
    return []
  last = f"{block_prefix}{model.layers - 1}."
  if not any(k.startswith(last) for k in sd):
    raise WeightLoadError(f"{what}: model.layers={model.layers} with output_layer='penultimate' "
                          f"skips block {model.layers - 1}, but the checkpoint has no {last}* "
                          "keys: its depth does not match the model.")
  return [last]


def _tokens() -> jax.Array:
  return jnp.zeros((1, 2), jnp.int32)  # parameter shapes do not depend on the length


# --------------------------------------------------------------------------------------------
# CLIP (transformers layout) and OpenCLIP
# --------------------------------------------------------------------------------------------

_CLIP_HF_PREFIXES = ("", "text_model.", "transformer.text_model.", "transformer.",
                     "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
# Our block module -> its transformers name; the projections are the modules LoRA files adapt.
_CLIP_HF_BLOCK = {"ln_attn": "layer_norm1", "ln_mlp": "layer_norm2", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                  "v": "self_attn.v_proj", "out": "self_attn.out_proj"}
CLIP_HF_BLOCK_MODULES = tuple(v for k, v in _CLIP_HF_BLOCK.items() if not k.startswith("ln_"))


def clip_hf_key_map(model: CLIPTextEncoder) -> dict[Path, tuple[str, Callable]]:
  """Every parameter path of a CLIPTextEncoder -> (transformers CLIPTextModel key without the
  `text_model.` level, transform). `clip_from_hf` loads through it, and so does anything else that
  addresses the encoder's weights by their transformers names (LoRA files)."""
  def key_fn(path: Path):
    if path[0] == "embed":
      return f"embeddings.{path[1]}.weight", identity
    if path[0] == "ln_final":
      return _leaf("final_layer_norm", path[-1])
    sub = path[2] if path[1] == "attn" else path[1]
    return _leaf(f"encoder.layers.{_block_index(path[0])}.{_CLIP_HF_BLOCK[sub]}", path[-1])

  return {path: key_fn(path) for path in flatten(_template(model, _tokens()))}


def clip_from_hf(sd: Mapping[str, Any], model: CLIPTextEncoder) -> Params:
  """HF CLIPTextModel weights (with or without the `text_model.` level) -> CLIPTextEncoder."""
  what = "clip_from_hf"
  _check_model(model, CLIPTextEncoder, what)
  sd = _select(sd, "embeddings.token_embedding.weight", _CLIP_HF_PREFIXES, what)
  skipped = _require_skipped_block(sd, model, "encoder.layers.", what)
  keys = clip_hf_key_map(model)
  return strict_load(_template(model, _tokens()), sd, keys.__getitem__, what=what,
                     ignore=("embeddings.position_ids", "text_projection.weight"),
                     ignore_prefixes=skipped)


def clip_from_openclip(sd: Mapping[str, Any], model: CLIPTextEncoder) -> Params:
  """OpenCLIP text tower (SD 2.x `cond_stage_model.model.*`) -> CLIPTextEncoder params.

  q, k and v come from the fused `attn.in_proj_weight` [3W, W] / `in_proj_bias` [3W] (rows q|k|v).
  """
  what = "clip_from_openclip"
  _check_model(model, CLIPTextEncoder, what)
  sd = _select(sd, "token_embedding.weight", ("", "model.", "cond_stage_model.model."), what)
  skipped = _require_skipped_block(sd, model, "transformer.resblocks.", what)
  width = model.width
  names = {"ln_attn": "ln_1", "ln_mlp": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj",
           "out": "attn.out_proj"}

  def fused(index: int, leaf: str):
    def take(w):
      if w.shape[0] != 3 * width:  # leave it whole so strict_load reports the real shape
        return w
      part = w[index * width:(index + 1) * width]
      return dense_kernel(part) if leaf == "kernel" else part
    return take

  def key_fn(path: Path):
    if path[0] == "embed":
      return {"token_embedding": "token_embedding.weight",
              "position_embedding": "positional_embedding"}[path[1]], identity
    if path[0] == "ln_final":
      return _leaf("ln_final", path[-1])
    prefix, sub, leaf = f"transformer.resblocks.{_block_index(path[0])}", path[1], path[-1]
    if sub == "attn" and path[2] in ("q", "k", "v"):
      key = f"{prefix}.attn.in_proj_{'weight' if leaf == 'kernel' else 'bias'}"
      return key, fused("qkv".index(path[2]), leaf)
    return _leaf(f"{prefix}.{names[path[2] if sub == 'attn' else sub]}", leaf)

  return strict_load(_template(model, _tokens()), sd, key_fn, what=what,
                     ignore=("text_projection", "logit_scale", "attn_mask"),
                     ignore_prefixes=("visual.",) + tuple(skipped))


# --------------------------------------------------------------------------------------------
# BERT (transformers BertModel)
# --------------------------------------------------------------------------------------------

_BERT_BLOCK = {"ln_attn": "attention.output.LayerNorm", "ln_mlp": "output.LayerNorm",
               "fc1": "intermediate.dense", "fc2": "output.dense", "q": "attention.self.query",
               "k": "attention.self.key", "v": "attention.self.value",
               "out": "attention.output.dense"}


def bert_from_hf(sd: Mapping[str, Any], model: BertEncoder) -> Params:
  """HF BertModel weights (unprefixed, or `bert.`-prefixed as in BertFor* heads) -> BertEncoder."""
  what = "bert_from_hf"
  _check_model(model, BertEncoder, what)
  sd = _select(sd, "embeddings.word_embeddings.weight", ("", "bert."), what)
  # Checkpoints converted from TF name LayerNorm parameters gamma/beta.
  sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in sd.items()}

  def key_fn(path: Path):
    if path[0] == "embed":
      if path[1] == "ln":
        return _leaf("embeddings.LayerNorm", path[-1])
      return f"embeddings.{path[1]}.weight", identity
    i, sub = _block_index(path[0]), path[1]
    sub = path[2] if sub == "attn" else sub
    return _leaf(f"encoder.layer.{i}.{_BERT_BLOCK[sub]}", path[-1])

  return strict_load(_template(model, _tokens()), sd, key_fn, what=what,
                     ignore=("embeddings.position_ids",), ignore_prefixes=("pooler.",))


# --------------------------------------------------------------------------------------------
# The LDM paper's text transformer
# --------------------------------------------------------------------------------------------

def ldm_text_from_compvis(sd: Mapping[str, Any], model: LDMTextTransformer) -> Params:
  """CompVis BERTEmbedder (`cond_stage_model.transformer.*`, x-transformers names) -> params.

  Layer 2i of `attn_layers.layers` is [LayerNorm, Attention, Residual] for block i and layer 2i+1
  is [LayerNorm, FeedForward, Residual]; FeedForward.net is [Sequential(Linear, GELU), Dropout,
  Linear].
  """
  what = "ldm_text_from_compvis"
  _check_model(model, LDMTextTransformer, what)
  sd = _select(sd, "token_emb.weight", ("", "transformer.", "cond_stage_model.transformer."), what)
  block = {"ln_attn": (0, "0"), "q": (0, "1.to_q"), "k": (0, "1.to_k"), "v": (0, "1.to_v"),
           "out": (0, "1.to_out"), "ln_mlp": (1, "0"), "fc1": (1, "1.net.0.0"),
           "fc2": (1, "1.net.2")}

  def key_fn(path: Path):
    if path[0] == "embed":
      return {"token_embedding": "token_emb.weight",
              "position_embedding": "pos_emb.emb.weight"}[path[1]], identity
    if path[0] == "ln_final":
      return _leaf("norm", path[-1])
    sub = path[2] if path[1] == "attn" else path[1]
    offset, name = block[sub]
    return _leaf(f"attn_layers.layers.{2 * _block_index(path[0]) + offset}.{name}", path[-1])

  return strict_load(_template(model, _tokens()), sd, key_fn, what=what,
                     ignore_prefixes=("to_logits.",))


def ldm_text_from_diffusers(sd: Mapping[str, Any], model: LDMTextTransformer) -> Params:
  """diffusers LDMBertModel (`model.*`; `to_logits` is outside it and not loaded) -> params."""
  what = "ldm_text_from_diffusers"
  _check_model(model, LDMTextTransformer, what)
  sd = _select(sd, "embed_tokens.weight", ("model.", ""), what)
  block = {"ln_attn": "self_attn_layer_norm", "ln_mlp": "final_layer_norm", "fc1": "fc1",
           "fc2": "fc2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
           "v": "self_attn.v_proj", "out": "self_attn.out_proj"}

  def key_fn(path: Path):
    if path[0] == "embed":
      return {"token_embedding": "embed_tokens.weight",
              "position_embedding": "embed_positions.weight"}[path[1]], identity
    if path[0] == "ln_final":
      return _leaf("layer_norm", path[-1])
    sub = path[2] if path[1] == "attn" else path[1]
    return _leaf(f"layers.{_block_index(path[0])}.{block[sub]}", path[-1])

  return strict_load(_template(model, _tokens()), sd, key_fn, what=what,
                     ignore_prefixes=("to_logits.",))


# --------------------------------------------------------------------------------------------
# Class embedder and spatial rescaler
# --------------------------------------------------------------------------------------------

def class_embedder_from_compvis(sd: Mapping[str, Any], model: ClassEmbedder) -> Params:
  """CompVis ClassEmbedder (`cond_stage_model.embedding.weight`) -> ClassEmbedder params."""
  what = "class_embedder_from_compvis"
  _check_model(model, ClassEmbedder, what)
  sd = _select(sd, "embedding.weight", ("", "cond_stage_model."), what)
  return strict_load(_template(model, jnp.zeros((1,), jnp.int32)), sd,
                     lambda path: ("embedding.weight", identity), what=what)


def spatial_rescaler_from_compvis(sd: Mapping[str, Any], model: SpatialRescaler) -> Params:
  """CompVis SpatialRescaler (`channel_mapper.weight` [O, I, 1, 1], optional bias) -> params.
  A rescaler without out_channels has no parameters and accepts only an empty state dict."""
  what = "spatial_rescaler_from_compvis"
  _check_model(model, SpatialRescaler, what)
  if model.out_channels is None:
    if sd:
      raise WeightLoadError(f"{what}: model.out_channels=None has no parameters, but the state "
                            f"dict has {sorted(sd)[:8]}; expected none.")
    return {}
  sd = _select(sd, "channel_mapper.weight", ("", "cond_stage_model."), what)
  # Any size that survives n_stages resizes; parameter shapes do not depend on it.
  size = 2 * math.ceil(max(1.0, 1.0 / model.multiplier) ** model.n_stages)
  x = jnp.zeros((1, size, size, model.in_channels), jnp.float32)

  def key_fn(path: Path):
    return ("channel_mapper.weight", conv_kernel) if path[-1] == "kernel" else \
        ("channel_mapper.bias", identity)

  return strict_load(_template(model, x), sd, key_fn, what=what)


# --------------------------------------------------------------------------------------------
# Module kwargs from transformers config.json files
# --------------------------------------------------------------------------------------------

_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _activation(config: Mapping[str, Any], default: str, what: str) -> str:
  act = config.get("hidden_act", default)
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"{what}: hidden_act={act!r}; expected one of {sorted(_HF_ACTIVATIONS)}.")
  return _HF_ACTIVATIONS[act]


def clip_kwargs_from_hf_config(config: Mapping[str, Any],
                               output_layer: str = "last") -> dict[str, Any]:
  """CLIPTextConfig dict (or a full CLIPConfig with `text_config`) -> CLIPTextEncoder kwargs."""
  c = config.get("text_config") or config.get("text_config_dict") or config
  model_type = c.get("model_type", "clip_text_model")
  if model_type not in ("clip_text_model", "clip"):
    raise ValueError(f"clip config: model_type={model_type!r}; expected 'clip_text_model'.")
  return dict(vocab_size=c.get("vocab_size", 49408), width=c.get("hidden_size", 512),
              layers=c.get("num_hidden_layers", 12), heads=c.get("num_attention_heads", 8),
              mlp_dim=c.get("intermediate_size", 2048),
              max_length=c.get("max_position_embeddings", 77),
              activation=_activation(c, "quick_gelu", "clip config"),
              epsilon=c.get("layer_norm_eps", 1e-5), output_layer=output_layer)


def bert_kwargs_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """BertConfig dict -> BertEncoder kwargs (absolute position embeddings only)."""
  pos_type = config.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(f"bert config: position_embedding_type={pos_type!r}; expected 'absolute'.")
  return dict(vocab_size=config.get("vocab_size", 30522),
              max_position=config.get("max_position_embeddings", 512),
              type_vocab_size=config.get("type_vocab_size", 2),
              width=config.get("hidden_size", 768), layers=config.get("num_hidden_layers", 12),
              heads=config.get("num_attention_heads", 12),
              mlp_dim=config.get("intermediate_size", 3072),
              activation=_activation(config, "gelu", "bert config"),
              epsilon=config.get("layer_norm_eps", 1e-12))


def ldm_text_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers LDMBertConfig dict (text_encoder/config.json) -> LDMTextTransformer kwargs."""
  width = config.get("d_model", 1280)
  ffn = config.get("encoder_ffn_dim", 5120)
  if ffn % width:
    raise ValueError(f"ldmbert config: encoder_ffn_dim={ffn} is not a multiple of d_model={width};"
                     " expected mlp_ratio * d_model.")
  if config.get("activation_function", "gelu") != "gelu":
    raise ValueError(f"ldmbert config: activation_function={config['activation_function']!r}; "
                     "expected 'gelu'.")
  return dict(vocab_size=config.get("vocab_size", 30522),
              max_length=config.get("max_position_embeddings", 77), width=width,
              depth=config.get("encoder_layers", 32),
              heads=config.get("encoder_attention_heads", 8),
              head_dim=config.get("head_dim", 64), mlp_ratio=ffn // width)
