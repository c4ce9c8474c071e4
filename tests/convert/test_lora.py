"""LoRA files against peft + the torch models they were written for.

A tiny diffusers UNet2DConditionModel and a transformers CLIPTextModel get random weights; peft
injects adapters (random non-zero factors, linear, 1x1 conv proj_in and 3x3 conv resnet kernels) and
writes them in the diffusers layout. ldm_jax imports the base weights, merges the file and must give
the torch model-with-adapters' outputs (<= 1e-4 of the output scale). A Kohya file built by hand from
the same matrices (with an alpha != rank, compensated in the up factors) must give the same result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

peft = pytest.importorskip("peft")

from assets_util import assert_close, randomize_, state_dict_numpy, tiny_lora_unet
from ldm_jax.convert import lora as lora_lib
from ldm_jax.convert import text as text_convert
from ldm_jax.convert import unet as unet_convert
from ldm_jax.models import build

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _torch_unet():
  return tiny_lora_unet(seed=2)


def _torch_text():
  import transformers
  config = transformers.CLIPTextConfig(
      vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
      bos_token_id=98, eos_token_id=99, pad_token_id=99)
  m = transformers.CLIPTextModel(config)
  randomize_(m, std=0.1, seed=3)
  return m.eval()


def _add_adapter(model, targets, name, seed, config=None):
  """peft adapter `name` (by default alpha = rank: such files carry no alpha) with random non-zero
  factors; returns its state dict as numpy."""
  config = config or peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets,
                                     lora_dropout=0.0)
  peft.inject_adapter_in_model(config, model, adapter_name=name)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if f".{name}." in n and "lora_" in n:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  return {k: v.detach().numpy().copy()
          for k, v in peft.get_peft_model_state_dict(model, adapter_name=name).items()}


def _activate(model, names, scale=1.0):
  from peft.tuners.lora import LoraLayer
  for m in model.modules():
    if isinstance(m, LoraLayer):
      m.set_adapter(list(names))
      for n in (n for n in names if n in m.r):  # the layers of adapter b lack a, and back
        m.scaling[n] = scale * m.lora_alpha[n] / m.r[n]


def _base_numpy(model):
  """The base weights in their original names (peft renames them `<module>.base_layer.*`)."""
  return {k.replace(".base_layer.", "."): v for k, v in state_dict_numpy(model).items()
          if "lora_" not in k}


def _kohya(peft_sd, prefix, alpha):
  """The same matrices in the Kohya layout: underscored names, lora_down/lora_up, an alpha; the up
  factor is multiplied by rank / alpha so the update stays the same."""
  out = {}
  for key, value in peft_sd.items():
    module, _, role = key.rpartition(".lora_")
    name = prefix + module.replace(".", "_")
    if role == "A.weight":
      out[f"{name}.lora_down.weight"] = value
    else:
      out[f"{name}.lora_up.weight"] = value * (RANK / alpha)
      out[f"{name}.alpha"] = np.array(alpha, np.float32)
  return out


def _write(path, sd):
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Torch models with two UNet adapters and one text adapter, their files, our base params."""
  tmp = tmp_path_factory.mktemp("lora")
  unet, text = _torch_unet(), _torch_text()
  base_unet = state_dict_numpy(unet)
  base_text = state_dict_numpy(text)
  unet_a = _add_adapter(unet, UNET_TARGETS, "a", seed=10)
  unet_b = _add_adapter(unet, ["to_k", "conv2"], "b", seed=11)
  text_a = _add_adapter(text, TEXT_TARGETS, "a", seed=12)
  # Alphas that differ from the rank, carried only by the PEFT config diffusers writes in the header.
  c_config = peft.LoraConfig(r=RANK, lora_alpha=8, alpha_pattern={"to_k": 2, "attn2.to_q": 1},
                             target_modules=["to_q", "to_k"], lora_dropout=0.0)
  unet_c = _add_adapter(unet, None, "c", seed=13, config=c_config)
  from diffusers import StableDiffusionPipeline
  StableDiffusionPipeline.save_lora_weights(
      str(tmp / "c"), unet_lora_layers={k: torch.from_numpy(v) for k, v in unet_c.items()},
      unet_lora_adapter_metadata=c_config.to_dict(), weight_name="c.safetensors")
  assert _base_numpy(unet).keys() == base_unet.keys()
  files = {
      "unet_a": _write(tmp / "unet_a.safetensors", {f"unet.{k}": v for k, v in unet_a.items()}),
      "unet_b": _write(tmp / "unet_b.safetensors", {f"unet.{k}": v for k, v in unet_b.items()}),
      "text_a": _write(tmp / "text_a.safetensors",
                       {f"text_encoder.{k}": v for k, v in text_a.items()}),
      "unet_c": str(tmp / "c" / "c.safetensors"),
      "kohya": _write(tmp / "kohya.safetensors", {**_kohya(unet_a, "lora_unet_", 8.0),
                                                  **_kohya(text_a, "lora_te_", 2.0)}),
  }
  unet_kwargs = unet_convert.unet_kwargs_from_diffusers_config(dict(unet.config))
  text_kwargs = text_convert.clip_kwargs_from_hf_config(text.config.to_dict())
  config = {"unet": unet_kwargs, "cond_stage": {"kind": "clip", "kwargs": text_kwargs}}
  our_unet = build.build_unet(unet_kwargs)
  our_text = build.build_cond_stage(config["cond_stage"])
  params = {"unet": {"params": unet_convert.unet_from_diffusers(base_unet, our_unet)},
            "cond_stage": {"params": text_convert.clip_from_hf(base_text, our_text)}}
  # Compiled once: every test passes its own params as arguments.
  unet_fn = jax.jit(lambda p, x, t, c: our_unet.apply(p, x, t, c))
  text_fn = jax.jit(lambda p, tokens: our_text.apply(p, tokens))
  return dict(unet=unet, text=text, files=files, config=config, params=params,
              unet_fn=unet_fn, text_fn=text_fn, tmp=tmp)


_RS = np.random.RandomState(0)
_X = _RS.randn(2, 4, 8, 8).astype(np.float32)
_T = np.array([3.0, 731.0], np.float32)
_CTX = _RS.randn(2, 5, 32).astype(np.float32)
_TOKENS = np.array([[1, 5, 9, 33, 2, 0], [7, 7, 80, 99, 4, 3]], np.int64)


def _torch_unet_out(s, names, scale=1.0):
  _activate(s["unet"], names, scale)
  with torch.no_grad():
    return s["unet"](torch.from_numpy(_X), torch.from_numpy(_T),
                     encoder_hidden_states=torch.from_numpy(_CTX)).sample.numpy()


def _our_unet_out(s, params):
  out = s["unet_fn"](params["unet"], jnp.asarray(_X.transpose(0, 2, 3, 1)),
                            jnp.asarray(_T), jnp.asarray(_CTX))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _torch_text_out(s, names, scale=1.0):
  _activate(s["text"], names, scale)
  with torch.no_grad():
    return s["text"](torch.from_numpy(_TOKENS)).last_hidden_state.numpy()


def _our_text_out(s, params):
  return np.asarray(s["text_fn"](params["cond_stage"], jnp.asarray(_TOKENS, jnp.int32)))


def _merged(s, *specs):
  return lora_lib.merge_files(s["config"], s["params"], specs)


def test_peft_unet_file_matches_torch(setup):
  s = setup
  ref = _torch_unet_out(s, ["a"], scale=0.7)
  plain = _torch_unet_out(s, [], scale=1.0)
  assert np.abs(ref - plain).max() > 1e-2 * np.abs(plain).max()  # the adapter does something
  lora = lora_lib.read(s["files"]["unet_a"], s["config"])
  assert any(len(u.down.shape) == 4 and u.down.shape[2:] == (3, 3) for u in lora.updates)
  assert_close(_our_unet_out(s, _merged(s, s["files"]["unet_a"] + ":0.7")), ref, what="unet a")


def test_two_files_at_once_match_torch(setup):
  s = setup
  ref = _torch_unet_out(s, ["a", "b"], scale=1.0)
  merged = _merged(s, s["files"]["unet_a"], s["files"]["unet_b"])
  assert_close(_our_unet_out(s, merged), ref, what="unet a + b")


def test_peft_text_file_matches_torch(setup):
  s = setup
  ref = _torch_text_out(s, ["a"], scale=1.0)
  merged = _merged(s, s["files"]["text_a"])
  assert merged["unet"] is s["params"]["unet"]  # untouched components are shared, not copied
  assert_close(_our_text_out(s, merged), ref, what="text a")


def test_alphas_from_the_diffusers_header_match_torch(setup):
  """lora_alpha and alpha_pattern from `lora_adapter_metadata` (written by diffusers)."""
  s = setup
  lora = lora_lib.read(s["files"]["unet_c"], s["config"])
  scalings = {u.module.rsplit(".", 2)[-2] + "." + u.module.rsplit(".", 1)[-1]: u.scaling
              for u in lora.updates}
  assert scalings == {"attn1.to_q": 2.0, "attn1.to_k": 0.5, "attn2.to_q": 0.25, "attn2.to_k": 0.5}
  ref = _torch_unet_out(s, ["c"])
  assert_close(_our_unet_out(s, _merged(s, s["files"]["unet_c"])), ref, what="unet c")


def test_kohya_layout_gives_the_same_result(setup):
  s = setup
  merged = _merged(s, s["files"]["kohya"])
  assert_close(_our_unet_out(s, merged), _torch_unet_out(s, ["a"]), what="kohya unet")
  assert_close(_our_text_out(s, merged), _torch_text_out(s, ["a"]), what="kohya text")


def test_compvis_unet_names_reach_the_same_parameters(setup):
  """A Kohya file naming the UNet's CompVis modules merges into the same parameter."""
  s = setup
  d = np.full((RANK, 32), 0.1, np.float32)
  u = np.full((32, RANK), 0.2, np.float32)
  a = _write(s["tmp"] / "cv.safetensors", {
      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": d,
      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": u})
  b = _write(s["tmp"] / "df.safetensors", {
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": d,
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": u})
  (ua,), (ub,) = lora_lib.read(a, s["config"]).updates, lora_lib.read(b, s["config"]).updates
  assert ua.path == ub.path and ua.path[-1] == "kernel"


def test_jitted_apply_takes_the_scale_as_a_traced_value(setup):
  s = setup
  lora = lora_lib.read(s["files"]["unet_a"], s["config"])
  ds = lora_lib.deltas(s["params"], [lora])
  fn = jax.jit(lambda p, d, scale: lora_lib.apply(p, d, [scale]))
  for scale in (0.3, 1.5):
    applied = fn(s["params"], ds, jnp.float32(scale))
    merged = lora_lib.merge(s["params"], [(lora, scale)])
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                           applied, merged)
  assert fn._cache_size() == 1


def test_unmatched_keys_are_an_error_naming_file_and_keys(setup):
  s = setup
  sd = safetensors.numpy.load_file(s["files"]["unet_a"])
  sd["unet.down_blocks.9.attentions.0.to_q.lora_A.weight"] = np.zeros((RANK, 32), np.float32)
  sd["unet.down_blocks.9.attentions.0.to_q.lora_B.weight"] = np.zeros((32, RANK), np.float32)
  sd["something_else.weight"] = np.zeros((2,), np.float32)
  path = _write(s["tmp"] / "unmatched.safetensors", sd)
  with pytest.raises(lora_lib.LoraError) as e:
    lora_lib.read(path, s["config"])
  msg = str(e.value)
  assert path in msg and "keys that match nothing (3)" in msg
  assert "unet.down_blocks.9.attentions.0.to_q.lora_A.weight" in msg
  assert "something_else.weight" in msg


def test_text_keys_need_a_clip_text_encoder(setup):
  s = setup
  config = dict(s["config"], cond_stage={"kind": "none"})
  with pytest.raises(lora_lib.LoraError, match="without a CLIP text encoder"):
    lora_lib.read(s["files"]["text_a"], config)


def test_incomplete_pairs_and_bad_shapes_are_errors(setup):
  s = setup
  sd = safetensors.numpy.load_file(s["files"]["unet_a"])
  key = next(k for k in sorted(sd) if k.endswith("attn1.to_q.lora_B.weight"))
  half = _write(s["tmp"] / "half.safetensors", {k: v for k, v in sd.items() if k != key})
  with pytest.raises(lora_lib.LoraError, match="the up factor is missing"):
    lora_lib.read(half, s["config"])
  twice = dict(sd)
  twice[key.replace("lora_B", "lora_up")] = sd[key]
  with pytest.raises(lora_lib.LoraError, match="two tensors for the up factor"):
    lora_lib.read(_write(s["tmp"] / "twice.safetensors", twice), s["config"])
  wide = dict(sd)
  wide[key] = np.zeros((48, RANK), np.float32)  # to_q has 32 outputs
  wide[key.replace("lora_B", "lora_A")] = np.zeros((RANK, 32), np.float32)
  lora = lora_lib.read(_write(s["tmp"] / "wide.safetensors", wide), s["config"])
  with pytest.raises(lora_lib.LoraError, match=r"shape \(32, 48\).*is \(32, 32\)"):
    lora_lib.merge(s["params"], [(lora, 1.0)])


def test_parse_spec():
  assert lora_lib.parse_spec("a.safetensors") == ("a.safetensors", 1.0)
  assert lora_lib.parse_spec("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
  assert lora_lib.parse_spec("C:/a.safetensors") == ("C:/a.safetensors", 1.0)
  with pytest.raises(ValueError, match="not finite"):
    lora_lib.parse_spec("a.safetensors:nan")


def test_penultimate_encoder_lists_the_unused_last_block(setup):
  """SD 2.x style: the last CLIP block is never run, so its LoRA keys are listed as unused, and the
  rest of the file still matches torch (ln_final over the penultimate hidden state)."""
  s = setup
  cond = {"kind": "clip", "kwargs": dict(s["config"]["cond_stage"]["kwargs"],
                                         output_layer="penultimate")}
  config = dict(s["config"], cond_stage=cond)
  encoder = build.build_cond_stage(cond)
  params = {"cond_stage": {"params": text_convert.clip_from_hf(_base_numpy(s["text"]), encoder)}}
  lora = lora_lib.read(s["files"]["text_a"], config)
  assert lora.unused and all(".layers.1." in k for k in lora.unused)
  assert {u.path[0] for u in lora.updates} == {"blocks_0"}
  merged = lora_lib.merge(params, [(lora, 1.0)])
  ours = np.asarray(encoder.apply(merged["cond_stage"], jnp.asarray(_TOKENS, jnp.int32)))
  _activate(s["text"], ["a"])
  with torch.no_grad():
    hidden = s["text"](torch.from_numpy(_TOKENS), output_hidden_states=True).hidden_states[-2]
    ref = s["text"].get_submodule(next(n for n, _ in s["text"].named_modules()
                                       if n.endswith("final_layer_norm")))(hidden).numpy()
  assert_close(ours, ref, what="penultimate")
