"""Text encoders and their importers against independent torch references.

References: transformers CLIPTextModel (quick_gelu / last layer, and gelu / penultimate layer
through final_layer_norm, which is what SD 2.x's OpenCLIP embedder computes), transformers
BertModel (random and the real pretrained MiniLM), diffusers LDMBertModel. Every torch weight is re-drawn non-zero.
Tolerance: max abs error <= 1e-4 relative to the output's scale.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from assets_util import assert_close, minilm_dir, randomize_, state_dict_numpy
from ldm_jax.convert.common import WeightLoadError
from ldm_jax.convert.text import (bert_from_hf, bert_kwargs_from_hf_config, clip_from_hf,
                                  clip_from_openclip, clip_kwargs_from_hf_config,
                                  ldm_text_from_compvis, ldm_text_from_diffusers,
                                  ldm_text_kwargs_from_diffusers_config)
from ldm_jax.models.bert import BertEncoder
from ldm_jax.convert.compvis_config import TEXT_MODELS
from ldm_jax.models.text import CLIPTextEncoder, LDMTextTransformer
from ldm_jax.models.tokenizers import load_tokenizer, tokenize

transformers.logging.set_verbosity_error()
torch.manual_seed(0)

SEQ = 77


def _tokens(vocab, batch=2, length=SEQ, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _apply(model, params, *args):
  """Jitted apply: one compilation is cheaper than op-by-op dispatch on a busy CPU."""
  return np.asarray(jax.jit(model.apply)({"params": params}, *args))


def _clip_reference(hidden_act):
  config = transformers.CLIPTextConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=SEQ, hidden_act=hidden_act,
      bos_token_id=0, eos_token_id=1, pad_token_id=1)
  ref = transformers.CLIPTextModel(config).eval()
  randomize_(ref, std=0.2)
  return config, ref


def test_clip_quick_gelu_last_layer_matches_hf():
  config, ref = _clip_reference("quick_gelu")
  tokens = _tokens(97)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens).long()).last_hidden_state.numpy()
  model = CLIPTextEncoder(**clip_kwargs_from_hf_config(config.to_dict()))
  assert model.activation == "quick_gelu" and model.layers == 3 and model.mlp_dim == 48
  sd = state_dict_numpy(ref)
  # transformers 5 saves without the `text_model.` level; SD 1.x checkpoints (transformers 4)
  # have it, under cond_stage_model.transformer., plus a position_ids buffer.
  sd_v4 = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.items()}
  sd_v4["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(SEQ)[None]
  sd_v4["model.diffusion_model.out.0.weight"] = np.ones(4, np.float32)  # outside the prefix
  params = clip_from_hf(sd, model)
  assert_close(_apply(model, params, tokens), want, what="CLIP last layer")
  jax.tree_util.tree_map(np.testing.assert_array_equal, clip_from_hf(sd_v4, model), params)
  # A shorter sequence uses the first positions, still causal.
  got_short = _apply(model, params, tokens[:, :9])
  with torch.no_grad():
    want_short = ref(torch.from_numpy(tokens[:, :9]).long()).last_hidden_state.numpy()
  assert_close(got_short, want_short, what="CLIP short sequence")


def _openclip_state_dict(hf_sd, layers):
  """The OpenCLIP text-tower layout, built from HF CLIP weights (q/k/v fused into in_proj)."""
  out = {"model.token_embedding.weight": hf_sd["embeddings.token_embedding.weight"],
         "model.positional_embedding": hf_sd["embeddings.position_embedding.weight"],
         "model.ln_final.weight": hf_sd["final_layer_norm.weight"],
         "model.ln_final.bias": hf_sd["final_layer_norm.bias"],
         # Parts of the OpenCLIP model that are not the per-token text features.
         "model.text_projection": np.ones((32, 16), np.float32),
         "model.logit_scale": np.ones((), np.float32),
         "model.visual.proj": np.ones((8, 16), np.float32)}
  for i in range(layers):
    h, o = f"encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      out[o + f"attn.in_proj_{kind}"] = np.concatenate(
          [hf_sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], axis=0)
      for hf_name, oc_name in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                               ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                               ("mlp.fc2", "mlp.c_proj")):
        out[o + f"{oc_name}.{kind}"] = hf_sd[h + f"{hf_name}.{kind}"]
  return out


def test_openclip_penultimate_gelu_matches_reference():
  config, ref = _clip_reference("gelu")
  tokens = _tokens(97, seed=1)
  with torch.no_grad():
    out = ref(torch.from_numpy(tokens).long(), output_hidden_states=True)
    want = ref.final_layer_norm(out.hidden_states[-2]).numpy()
  model = CLIPTextEncoder(vocab_size=97, width=32, layers=3, heads=4, mlp_dim=48,
                          activation="gelu", output_layer="penultimate")
  sd = _openclip_state_dict(state_dict_numpy(ref), layers=3)
  params = clip_from_openclip(sd, model)
  assert "blocks_2" not in params and "blocks_1" in params  # the unused last block is not built
  got = _apply(model, params, tokens)
  assert_close(got, want, what="OpenCLIP penultimate")
  # The last-layer variant of the same weights must differ, and match HF's last_hidden_state.
  model_last = model.clone(output_layer="last")
  got_last = _apply(model_last, clip_from_openclip(sd, model_last), tokens)
  assert_close(got_last, out.last_hidden_state.numpy(), what="OpenCLIP last")
  assert np.abs(np.asarray(got_last) - np.asarray(got)).max() > 1e-2
  # A checkpoint one block short would otherwise load silently into the penultimate model.
  short = {k: v for k, v in sd.items() if ".resblocks.2." not in k}
  with pytest.raises(WeightLoadError, match="depth does not match"):
    clip_from_openclip(short, model)


def test_bert_with_attention_mask_matches_hf():
  config = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=40,
                                   max_position_embeddings=64, type_vocab_size=2)
  ref = transformers.BertModel(config).eval()
  randomize_(ref, std=0.2, seed=2)
  ids = _tokens(101, length=20, seed=2)
  mask = np.ones_like(ids)
  mask[1, 13:] = 0  # second sequence is padded
  types = np.zeros_like(ids)
  types[:, 10:] = 1
  with torch.no_grad():
    want = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
               token_type_ids=torch.from_numpy(types).long()).last_hidden_state.numpy()
  model = BertEncoder(**bert_kwargs_from_hf_config(config.to_dict()))
  params = bert_from_hf({f"bert.{k}": v for k, v in state_dict_numpy(ref).items()}, model)
  got = _apply(model, params, ids, mask, types)
  assert_close(got, want, what="BERT")
  # The mask matters: without it the padded sequence's real tokens change.
  unmasked = _apply(model, params, ids, None, types)
  assert np.abs(unmasked[1, :13] - want[1, :13]).max() > 1e-3


def test_pretrained_minilm_matches_transformers_on_real_sentences():
  path = minilm_dir()
  ref = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
  tok = load_tokenizer("bert", path)
  prompts = ["A painting of a squirrel eating a burger.",
             "an astronaut riding a horse on the moon, trending on artstation"]
  ids = tokenize(tok, prompts, max_length=32)
  mask = (ids != 0).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  with open(os.path.join(path, "config.json")) as f:
    model = BertEncoder(**bert_kwargs_from_hf_config(json.load(f)))
  from safetensors.numpy import load_file
  params = bert_from_hf(load_file(os.path.join(path, "model.safetensors")), model)
  assert_close(_apply(model, params, ids, mask), want, what="MiniLM")


def _ldm_bert_reference(seed=3):
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                              LDMBertModel)
  # head_dim * heads (2 * 12 = 24) differs from d_model (32) as in the real model (8 * 64 vs 1280).
  config = LDMBertConfig(vocab_size=89, max_position_embeddings=SEQ, encoder_layers=2,
                         encoder_ffn_dim=128, encoder_attention_heads=2, head_dim=12, d_model=32)
  ref = LDMBertModel(config).eval()
  randomize_(ref, std=0.2, seed=seed)
  return config, ref


def _compvis_from_diffusers(sd, layers):
  """CompVis BERTEmbedder names (x-transformers), renamed from diffusers LDMBertModel weights."""
  out = {"cond_stage_model.transformer.token_emb.weight": sd["model.embed_tokens.weight"],
         "cond_stage_model.transformer.pos_emb.emb.weight": sd["model.embed_positions.weight"],
         "cond_stage_model.transformer.to_logits.weight": sd["to_logits.weight"],
         "cond_stage_model.transformer.to_logits.bias": sd["to_logits.bias"]}
  for kind in ("weight", "bias"):
    out[f"cond_stage_model.transformer.norm.{kind}"] = sd[f"model.layer_norm.{kind}"]
  for i in range(layers):
    d, a, f = f"model.layers.{i}.", f"cond_stage_model.transformer.attn_layers.layers.{2 * i}.", \
        f"cond_stage_model.transformer.attn_layers.layers.{2 * i + 1}."
    for p in "qkv":
      out[a + f"1.to_{p}.weight"] = sd[d + f"self_attn.{p}_proj.weight"]
    for kind in ("weight", "bias"):
      out[a + f"0.{kind}"] = sd[d + f"self_attn_layer_norm.{kind}"]
      out[a + f"1.to_out.{kind}"] = sd[d + f"self_attn.out_proj.{kind}"]
      out[f + f"0.{kind}"] = sd[d + f"final_layer_norm.{kind}"]
      out[f + f"1.net.0.0.{kind}"] = sd[d + f"fc1.{kind}"]
      out[f + f"1.net.2.{kind}"] = sd[d + f"fc2.{kind}"]
  return out


def test_ldm_text_transformer_matches_diffusers_ldmbert():
  config, ref = _ldm_bert_reference()
  tokens = _tokens(89, seed=3)
  tokens[:, 20:] = 0  # BERT padding, attended to as in the original (no mask)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens).long())[0].numpy()
  model = LDMTextTransformer(**ldm_text_kwargs_from_diffusers_config(config.to_dict()))
  assert (model.width, model.heads, model.head_dim, model.mlp_ratio) == (32, 2, 12, 4)
  sd = state_dict_numpy(ref)
  params = ldm_text_from_diffusers(sd, model)
  assert_close(_apply(model, params, tokens), want, what="LDM-BERT")
  compvis = ldm_text_from_compvis(_compvis_from_diffusers(sd, 2), model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, compvis, params)
  # With a padding mask (keys only), as LDMBertModel's attention_mask.
  mask = (tokens != 0).astype(np.int32)
  with torch.no_grad():
    want_masked = ref(torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(mask).long())[0].numpy()
  assert_close(_apply(model, params, tokens, mask), want_masked, what="LDM-BERT masked")


def test_strict_loading_reports_missing_unexpected_and_mismatched():
  _, ref = _clip_reference("quick_gelu")
  sd = state_dict_numpy(ref)
  model = CLIPTextEncoder(vocab_size=97, width=32, layers=3, heads=4, mlp_dim=48)
  bad = dict(sd)
  del bad["encoder.layers.1.mlp.fc1.bias"]
  bad["encoder.layers.3.mlp.fc1.bias"] = np.zeros(48, np.float32)
  bad["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
  with pytest.raises(WeightLoadError) as e:
    clip_from_hf(bad, model)
  msg = str(e.value)
  for fragment in ("missing keys (1)", "encoder.layers.1.mlp.fc1.bias",
                   "unexpected keys (1)", "encoder.layers.3.mlp.fc1.bias",
                   "shape mismatches (1)", "encoder.layers.0.self_attn.q_proj.weight"):
    assert fragment in msg, msg
  # A deeper model than the checkpoint, and a layout that is not CLIP at all.
  with pytest.raises(WeightLoadError, match="encoder.layers.3"):
    clip_from_hf(sd, model.clone(layers=4))
  with pytest.raises(WeightLoadError, match="token_embedding.weight"):
    clip_from_openclip(sd, model)
  with pytest.raises(TypeError, match="expected BertEncoder"):
    bert_from_hf(sd, model)
  # A wrong fused in_proj is reported with its real shape.
  oc = _openclip_state_dict(sd, 3)
  oc["model.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((64, 32), np.float32)
  with pytest.raises(WeightLoadError, match=r"in_proj_weight: checkpoint \(64, 32\)"):
    clip_from_openclip(oc, model)


def test_config_helpers_and_argument_errors():
  kw = clip_kwargs_from_hf_config({"text_config": {"hidden_size": 1024, "num_hidden_layers": 23,
                                                   "num_attention_heads": 16,
                                                   "intermediate_size": 4096,
                                                   "hidden_act": "gelu"}})
  assert kw["width"] == 1024 and kw["activation"] == "gelu" and kw["vocab_size"] == 49408
  with pytest.raises(ValueError, match="hidden_act='swish'"):
    clip_kwargs_from_hf_config({"hidden_act": "swish"})
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    bert_kwargs_from_hf_config({"position_embedding_type": "relative_key"})
  model = CLIPTextEncoder(vocab_size=10, width=8, layers=1, heads=2, max_length=4)
  with pytest.raises(ValueError, match="token length 5 exceeds max_length=4"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="output_layer='middle'"):
    model.clone(output_layer="middle").init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def test_bf16_compute_keeps_fp32_params_and_stays_close():
  model = LDMTextTransformer(vocab_size=50, max_length=16, width=32, depth=2, heads=2, head_dim=16)
  tokens = jnp.asarray(_tokens(50, length=16))
  shapes = jax.eval_shape(model.clone(dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  # Random parameters drawn on the host: a compiled random init costs seconds on a busy CPU.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes["params"])
  full = _apply(model, params, tokens)
  half = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, tokens)
  assert half.dtype == jnp.bfloat16
  assert_close(np.asarray(half, np.float32), full, rel=5e-2, what="bf16 vs fp32")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_parameter_counts_of_the_real_architectures():
  """Full-size models (shapes only; torch on the meta device) have exactly the reference counts."""
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                              LDMBertModel)

  def ours(model):
    return _count(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))

  def torch_count(module, skip=()):
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))

  with torch.device("meta"):
    vit_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    vit_h = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        hidden_act="gelu"))
    ldm = LDMBertModel(LDMBertConfig())  # the LAION 1.45B model's 1280-wide, 32-layer encoder
    bert = transformers.BertModel(transformers.BertConfig())
  sd1 = CLIPTextEncoder(**TEXT_MODELS["openai/clip-vit-large-patch14"])
  sd2 = CLIPTextEncoder(**TEXT_MODELS["ViT-H-14"], output_layer="penultimate")
  assert ours(sd1) == torch_count(vit_l) == 123_060_480  # SD 1.x text encoder
  assert ours(sd2) == torch_count(vit_h, skip=("encoder.layers.23.",))
  assert ours(LDMTextTransformer()) == torch_count(ldm, skip=("to_logits.",))
  assert ours(BertEncoder()) == torch_count(bert, skip=("pooler.",))
