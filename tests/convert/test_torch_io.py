"""Tests for ldm_jax.convert.torch_io: checkpoints written by torch / safetensors / diffusers read back
exactly as torch reads them, without running anything a malicious pickle asks for."""

import collections
import json
import os
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from ldm_jax.convert import torch_io
from ldm_jax.convert.torch_io import (CheckpointError, CheckpointNotFoundError, OpaqueGlobal,
                                      UnsafeCheckpointError)


def _as_np(t: torch.Tensor) -> np.ndarray:
  """torch's own values, bf16 through its exact fp32 widening."""
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _assert_same(ours: np.ndarray, ref: torch.Tensor, key: str):
  want = _as_np(ref)
  assert ours.shape == tuple(ref.shape), key
  expect_dtype = ml_dtypes.bfloat16 if ref.dtype == torch.bfloat16 else want.dtype
  assert ours.dtype == expect_dtype, (key, ours.dtype, ref.dtype)
  np.testing.assert_array_equal(ours.astype(want.dtype), want, err_msg=key)


@pytest.fixture
def fake_lightning():
  """A `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` class that pickle can name
  while saving (registered as a fake module only for the duration of the test)."""
  names = ["pytorch_lightning", "pytorch_lightning.callbacks",
           "pytorch_lightning.callbacks.model_checkpoint"]
  mods = {n: types.ModuleType(n) for n in names}
  cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
  hparams = type("HParams", (), {"__module__": names[-1]})
  mods[names[-1]].ModelCheckpoint = cls
  mods[names[-1]].HParams = hparams
  sys.modules.update(mods)
  yield cls, hparams
  for n in names:
    del sys.modules[n]


def _lightning_ckpt(cls, hparams_cls):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  shared = torch.randn(10, generator=g)
  sd = collections.OrderedDict([
      ("model.diffusion_model.w", base),
      ("model.diffusion_model.w_t", base.t()),  # transposed view of the same storage
      ("model.diffusion_model.w_slice", base[1:5:2, ::3]),  # offset + strides
      ("first_stage_model.half", torch.randn(3, 4, generator=g).half()),
      ("first_stage_model.bf16", torch.randn(5, 3, generator=g).to(torch.bfloat16)),
      ("cond_stage_model.ids", torch.arange(7)),
      ("cond_stage_model.mask", torch.tensor([True, False, True])),
      ("shared_a", shared[2:6]),  # two tensors on one storage
      ("shared_b", shared[4:]),
      ("expanded", torch.randn(1, 3, generator=g).expand(4, 3)),  # zero stride
      ("param", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
      ("scalar", torch.tensor(3.5)),
      ("empty", torch.zeros(0, 4)),
  ])
  hp = hparams_cls()
  hp.lr = 1e-4
  return {"state_dict": sd, "global_step": 1234, "epoch": 3,
          "pytorch-lightning_version": "1.4.2",
          "callbacks": {cls: {"best_model_score": torch.tensor(0.25), "monitor": "val/loss"}},
          "hyper_parameters": hp, "size": torch.Size([2, 3]), "dtype": torch.float16,
          "numpy": {"scalar": np.float64(0.5), "array": np.arange(6, dtype=np.int16).reshape(2, 3)},
          "optimizer_states": [{"state": {0: {"exp_avg": base * 2}}, "param_groups": [{"lr": 1e-4}]}]}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_checkpoint_matches_torch_load(tmp_path, fake_lightning, zip_format):
  cls, hparams_cls = fake_lightning
  path = tmp_path / "model.ckpt"
  obj = _lightning_ckpt(cls, hparams_cls)
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  ref = torch.load(path, weights_only=False)
  ours = torch_io.load_torch_checkpoint(path)

  assert list(ours["state_dict"]) == list(ref["state_dict"])
  for k, v in ref["state_dict"].items():
    _assert_same(ours["state_dict"][k], v, k)
  assert ours["global_step"] == 1234 and ours["epoch"] == 3
  assert ours["size"] == (2, 3) and ours["dtype"] == "torch.float16"
  assert ours["numpy"]["scalar"] == 0.5 and ours["numpy"]["scalar"].dtype == np.float64
  np.testing.assert_array_equal(ours["numpy"]["array"], ref["numpy"]["array"])
  assert ours["numpy"]["array"].dtype == np.int16
  _assert_same(ours["optimizer_states"][0]["state"][0]["exp_avg"],
               ref["optimizer_states"][0]["state"][0]["exp_avg"], "exp_avg")
  # Contiguous views of one storage share memory, as in torch.
  assert np.shares_memory(ours["state_dict"]["shared_a"], ours["state_dict"]["shared_b"])
  # The callback class is a key, loaded as an inert placeholder carrying its global name.
  (key, value), = ours["callbacks"].items()
  assert isinstance(key, type) and issubclass(key, OpaqueGlobal)
  assert key.global_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
  assert value["monitor"] == "val/loss" and float(value["best_model_score"]) == 0.25
  # An instance of an unknown class keeps its state as data; no code of the class ran.
  assert isinstance(ours["hyper_parameters"], OpaqueGlobal)
  assert ours["hyper_parameters"].opaque_state == {"lr": 1e-4}
  with pytest.raises(UnsafeCheckpointError, match="ModelCheckpoint"):
    key()


def test_load_state_dict_unwraps_lightning(tmp_path, fake_lightning):
  path = tmp_path / "model.ckpt"
  obj = _lightning_ckpt(*fake_lightning)
  torch.save(obj, path)
  sd = torch_io.load_state_dict(path)
  assert list(sd) == list(obj["state_dict"])
  _assert_same(sd["first_stage_model.bf16"], obj["state_dict"]["first_stage_model.bf16"], "bf16")


class _Evil:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _evil_payloads(marker):
  import subprocess
  return {
      "os.system": (os.system, (f"touch {marker}",)),
      "eval": (eval, (f"open({str(marker)!r}, 'w').close()",)),
      "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused(tmp_path, zip_format, payload):
  marker = tmp_path / "pwned"
  fn, args = _evil_payloads(marker)[payload]
  path = tmp_path / "evil.ckpt"
  torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Evil(fn, args)}, path,
             _use_new_zipfile_serialization=zip_format)
  global_name = {"os.system": "system", "eval": "builtins.eval",
                 "subprocess.Popen": "subprocess.Popen"}[payload]
  with pytest.raises(UnsafeCheckpointError, match=global_name) as info:
    torch_io.load_torch_checkpoint(path)
  assert str(path) in str(info.value)
  with pytest.raises(UnsafeCheckpointError):
    torch_io.load_state_dict(path)
  assert not marker.exists()


def test_out_of_bounds_tensor_geometry_is_refused(tmp_path):
  """A hand-made pickle claiming more elements than its storage holds must not read past it."""

  class Storage:
    pass

  storage = Storage()

  class Tensor:
    def __reduce__(self):
      return torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False,
                                               collections.OrderedDict())

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

  import io
  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump({"w": Tensor()})
  path = tmp_path / "oob.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
  with pytest.raises(CheckpointError, match="past its storage"):
    torch_io.load_torch_checkpoint(path)


def test_build_cannot_modify_allowed_globals(tmp_path):
  """BUILD right after GLOBAL would write attributes onto our shared rebuild function."""
  data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"  # PROTO 2, GLOBAL
          b"}X\x0c\x00\x00\x00__defaults__N"  # EMPTY_DICT, BINUNICODE, NONE
          b"sb.")  # SETITEM, BUILD, STOP
  path = tmp_path / "build.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data)
  with pytest.raises(UnsafeCheckpointError, match="refusing to modify"):
    torch_io.load_torch_checkpoint(path)


def test_clear_errors(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match="no such"):
    torch_io.load_state_dict(tmp_path / "missing.ckpt")
  assert issubclass(CheckpointNotFoundError, FileNotFoundError)

  good = tmp_path / "good.ckpt"
  torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
  data = good.read_bytes()
  truncated = tmp_path / "truncated.ckpt"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
    torch_io.load_state_dict(truncated)
  assert str(truncated) in str(info.value)

  text = tmp_path / "notes.ckpt"
  text.write_text("hello, not a checkpoint")
  with pytest.raises(CheckpointError, match="not a torch checkpoint"):
    torch_io.load_state_dict(text)

  other = tmp_path / "weights.npz"
  other.write_bytes(b"x")
  with pytest.raises(CheckpointError, match="unrecognised checkpoint extension"):
    torch_io.load_state_dict(other)

  nested = tmp_path / "nested.pt"
  torch.save({"model": {"w": torch.ones(1)}}, nested)
  with pytest.raises(CheckpointError, match="'model'"):
    torch_io.load_state_dict(nested)


def test_safetensors_round_trip(tmp_path):
  from safetensors.torch import load_file, save_file
  g = torch.Generator().manual_seed(1)
  tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(4, generator=g).half(),
             "bf16": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
             "i64": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False]),
             "scalar": torch.tensor(1.5)}
  path = tmp_path / "w.safetensors"
  save_file(tensors, str(path), metadata={"format": "pt"})
  ref = load_file(str(path))
  ours = torch_io.load_safetensors(path)
  assert set(ours) == set(ref)
  for k, v in ref.items():
    _assert_same(ours[k], v, k)
  assert torch_io.load_state_dict(path).keys() == ours.keys()

  data = path.read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-8])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    torch_io.load_safetensors(tmp_path / "cut.safetensors")


def test_sharded_index(tmp_path):
  from safetensors.torch import save_file
  a, b = torch.randn(3), torch.randn(2, 2)
  save_file({"a": a}, str(tmp_path / "m-00001.safetensors"))
  torch.save({"b": b}, tmp_path / "m-00002.bin")
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a": "m-00001.safetensors", "b": "m-00002.bin"}}))
  sd = torch_io.load_state_dict(index)
  _assert_same(sd["a"], a, "a")
  _assert_same(sd["b"], b, "b")
  index.write_text(json.dumps({"weight_map": {"a": "m-00001.safetensors", "c": "m-00002.bin"}}))
  with pytest.raises(CheckpointError, match="missing from the shards"):
    torch_io.load_state_dict(index)


def _randomised(module):
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.2)
  return module


def _tiny_pipeline(folder, safe, variant=None):
  from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(0)
  unet = _randomised(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=8, norm_num_groups=32))
  vae = _randomised(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
      down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
      layers_per_block=1, norm_num_groups=32))
  text = _randomised(CLIPTextModel(CLIPTextConfig(
      vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16)))
  models = {"unet": unet, "vae": vae, "text_encoder": text}
  for name, m in models.items():
    if variant:
      m = m.half()
    kw = dict(max_shard_size="600KB") if name == "unet" and not variant else {}
    m.save_pretrained(folder / name, safe_serialization=safe, variant=variant, **kw)
    if name == "text_encoder" and not safe:
      # transformers 5 always writes safetensors; older versions wrote pytorch_model.bin.
      (folder / name / "model.safetensors").unlink()
      torch.save(m.state_dict(), folder / name / "pytorch_model.bin")
  DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
  (folder / "tokenizer").mkdir()
  (folder / "tokenizer" / "vocab.json").write_text("{}")
  (folder / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
      "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
      "safety_checker": [None, None]}))
  return models


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_diffusers_folder(tmp_path, safe):
  models = _tiny_pipeline(tmp_path, safe)
  # The UNet was written in shards, with an index; the text encoder as model.safetensors or
  # pytorch_model.bin.
  ext = "safetensors" if safe else "bin"
  assert (tmp_path / "unet" / f"diffusion_pytorch_model.{ext}.index.json").is_file()
  assert len(list((tmp_path / "unet").glob(f"*-of-*.{ext}"))) > 1
  assert (tmp_path / "text_encoder" / ("model.safetensors" if safe else "pytorch_model.bin")
          ).is_file()
  out = torch_io.read_diffusers_folder(tmp_path)
  assert set(out) == {"model_index", "unet", "vae", "text_encoder", "scheduler", "tokenizer"}
  for name, model in models.items():
    config, sd = out[name]
    ref = model.state_dict()
    persistent = {k for k in ref if not k.endswith("position_ids")} if name == "text_encoder" \
        else set(ref)
    assert persistent <= set(sd) <= set(ref), name
    for k in sd:
      _assert_same(sd[k], ref[k], f"{name}/{k}")
  assert out["unet"][0]["block_out_channels"] == [32, 64]
  assert out["text_encoder"][0]["hidden_size"] == 32
  assert out["scheduler"] == (json.loads((tmp_path / "scheduler" /
                                          "scheduler_config.json").read_text()), {})
  assert out["tokenizer"][0]["path"] == str(tmp_path / "tokenizer")


def test_diffusers_fp16_variant(tmp_path):
  models = _tiny_pipeline(tmp_path, safe=True, variant="fp16")
  out = torch_io.read_diffusers_folder(tmp_path, variant="fp16")
  sd = out["vae"][1]
  assert all(v.dtype == np.float16 for v in sd.values())
  for k, v in models["vae"].state_dict().items():
    _assert_same(sd[k], v, k)  # the models were cast to half in place by save
  # Without a variant the fp16 files are still found, as the only weights there are.
  assert set(torch_io.read_diffusers_folder(tmp_path)["vae"][1]) == set(sd)
  with pytest.raises(CheckpointError, match="no weights found"):
    torch_io.read_diffusers_folder(tmp_path, variant="bf16")


def _compvis_sd(with_ema=True):
  g = torch.Generator().manual_seed(3)

  def t(*shape):
    return torch.randn(*shape, generator=g).numpy()

  unet_keys = {"time_embed.0.weight": t(8, 4), "input_blocks.0.0.weight": t(4, 4, 3, 3),
               "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": t(4, 4),
               "out.2.bias": t(4)}
  sd = {f"model.diffusion_model.{k}": v for k, v in unet_keys.items()}
  sd.update({"first_stage_model.encoder.conv_in.weight": t(8, 3, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": t(10, 4),
             "betas": t(1000), "alphas_cumprod": t(1000), "scale_factor": np.array(0.2345, np.float32)})
  ema = {}
  if with_ema:
    # LitEma registers `model_ema.<name>` with the dots of `model`'s parameter names removed.
    ema = {k: v + 1.0 for k, v in unet_keys.items()}
    sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()})
    sd.update({"model_ema.decay": np.array(0.9999, np.float32),
               "model_ema.num_updates": np.array(10, np.int32)})
  return sd, unet_keys, ema


def test_split_compvis_state_dict_and_ema():
  sd, unet, ema = _compvis_sd()
  parts = torch_io.split_compvis_state_dict(sd)
  assert parts["unet"].keys() == unet.keys()
  for k in unet:
    np.testing.assert_array_equal(parts["unet"][k], unet[k])
    np.testing.assert_array_equal(parts["ema"][k], ema[k])
  assert set(parts["first_stage"]) == {"encoder.conv_in.weight"}
  assert set(parts["cond_stage"]) == {"transformer.text_model.embeddings.token_embedding.weight"}
  assert set(parts["extra"]) == {"betas", "alphas_cumprod", "model_ema.decay",
                                 "model_ema.num_updates"}
  assert parts["scale_factor"] == pytest.approx(0.2345)

  with_ema = torch_io.split_compvis_state_dict(sd, use_ema=True)
  for k in unet:
    np.testing.assert_array_equal(with_ema["unet"][k], ema[k])

  no_ema, _, _ = _compvis_sd(with_ema=False)
  parts = torch_io.split_compvis_state_dict(no_ema)
  assert parts["ema"] == {}
  with pytest.raises(CheckpointError, match="no 'model_ema"):
    torch_io.split_compvis_state_dict(no_ema, use_ema=True)
  no_scale = {k: v for k, v in no_ema.items() if k != "scale_factor"}
  assert torch_io.split_compvis_state_dict(no_scale)["scale_factor"] is None

  stray = dict(sd, **{"model_ema.diffusion_modelnotthere": np.zeros(1)})
  with pytest.raises(CheckpointError, match="match no UNet weight"):
    torch_io.split_compvis_state_dict(stray)
