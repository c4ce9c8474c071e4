"""Reads torch, safetensors and diffusers checkpoints into numpy, without torch at run time.

Entry points:
  load_torch_checkpoint(path)   any `torch.save` file, unpickled through an allow-list
                                (see `torch_pickle`); unknown callables raise UnsafeCheckpointError.
  load_safetensors(path)        {name: array}; bf16 / fp8 via ml_dtypes.
  load_state_dict(path)         flat {name: array} from .ckpt/.pt/.pth/.bin/.safetensors or a sharded
                                `*.index.json`; Lightning's `state_dict` level is unwrapped.
  read_diffusers_folder(dir)    {component: (config, state_dict)} for a diffusers pipeline folder.
  split_compvis_state_dict(sd)  a LatentDiffusion state dict -> unet / first_stage / cond_stage /
                                ema / extra sub-dicts and the `scale_factor` buffer.
Every failure raises CheckpointError (a ValueError) whose message names the file.
"""

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ldm_jax.convert.torch_pickle import (CheckpointError, CheckpointNotFoundError, OpaqueGlobal,
                                          UnsafeCheckpointError, check_file, load_torch_checkpoint,
                                          to_native)

__all__ = ["CheckpointError", "CheckpointNotFoundError", "OpaqueGlobal", "UnsafeCheckpointError",
           "load_torch_checkpoint", "load_safetensors", "load_state_dict", "read_diffusers_folder",
           "split_compvis_state_dict"]

# safetensors dtype tag -> numpy dtype (safetensors.numpy itself has no bf16 / fp8).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def load_safetensors(path) -> dict[str, np.ndarray]:
  """Reads a .safetensors file: 8-byte header length, JSON header, then the tensor bytes."""
  path = check_file(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if n < 2 or n > size - 8:
      raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} B)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, spec in header.items():
      try:
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
        shape, (lo, hi) = tuple(int(n) for n in spec["shape"]), map(int, spec["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {spec!r:.200} "
                              f"(dtypes: {sorted(_SAFETENSORS_DTYPES)})") from None
      if hi - lo != int(np.prod(shape)) * dtype.itemsize or base + hi > size or lo < 0:
        raise CheckpointError(f"{path}: tensor '{name}' (bytes {lo}..{hi}, shape {shape}) does not "
                              f"fit the file of {size} bytes: truncated or corrupt")
      raw = np.empty(hi - lo, np.uint8)
      f.seek(base + lo)
      if f.readinto(memoryview(raw)) != raw.size:
        raise CheckpointError(f"{path}: tensor '{name}' is truncated")
      out[name] = to_native(raw, dtype, big_endian=False).reshape(shape)
  return out


_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _flat_state_dict(obj, path) -> dict[str, np.ndarray]:
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # Lightning: weights live under "state_dict"
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, np.ndarray):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a "
                            "flat {name: tensor} state dict (or one under 'state_dict')")
  return dict(obj)


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Flat {name: array} from .ckpt/.pt/.pth/.bin, .safetensors or a sharded *.index.json."""
  path = check_file(path)
  name = path.name.lower()
  if name.endswith(".index.json") or (name.endswith(".json") and ".index." in name):
    return _load_sharded(path)
  if name.endswith(".safetensors"):
    return load_safetensors(path)
  if name.endswith(_TORCH_SUFFIXES):
    return _flat_state_dict(load_torch_checkpoint(path), path)
  raise CheckpointError(f"{path}: unrecognised checkpoint extension; expected one of "
                        f"{_TORCH_SUFFIXES + ('.safetensors', '.index.json')}")


def _load_sharded(index_path: Path) -> dict[str, np.ndarray]:
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: not a sharded-weights index ({e!r})") from None
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    if not isinstance(shard, str) or Path(shard).name != shard:  # shards sit beside the index
      raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in this folder")
    out.update(load_state_dict(index_path.parent / shard))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise CheckpointError(f"{index_path}: {len(missing)} tensors listed in the index are missing "
                          f"from the shards, e.g. {missing[:5]}")
  return out


# ---------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_DEFAULT_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")


def _weight_candidates(stem_variant: str) -> list[str]:
  """File names a diffusers / transformers component may store its weights under."""
  names = []
  for ext in ("safetensors", "bin"):  # safetensors first: no pickle, faster
    for stem in _WEIGHT_STEMS:
      names.append(f"{stem}{stem_variant}.{ext}")
      # Sharded: diffusers writes `<stem>.<ext>.index[.variant].json`.
      names.append(f"{stem}.{ext}.index{stem_variant}.json")
  return names


def _component_weights(folder: Path, variant: str | None) -> Path:
  tried = []
  # Without an explicit variant, full-precision files win and fp16 ones are the fallback.
  for v in ([f".{variant}"] if variant else ["", ".fp16"]):
    for name in _weight_candidates(v):
      tried.append(name)
      if (folder / name).is_file():
        return folder / name
  present = sorted(p.name for p in folder.iterdir())
  raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(tried[:8])}, ...; "
                        f"the folder holds {present})")


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def read_diffusers_folder(folder, *, variant: str | None = None,
                          components=None) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
  """Reads a diffusers pipeline folder (as written by `save_pretrained`).

  Args:
    folder: the pipeline directory.
    variant: e.g. "fp16" to read only `*.fp16.*` weights; None prefers full-precision files.
    components: names to read; default: those in `model_index.json`, else unet, vae,
      text_encoder, scheduler and tokenizer where present.
  Returns:
    {name: (config, state_dict)}. Models (unet, vae, text_encoder, ...) give their `config.json`
    and weights; `scheduler` gives `scheduler_config.json` and {}; `tokenizer` gives
    {"path": <dir>} and {}; `model_index` (when the file exists) gives its content and {}.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointNotFoundError(f"{folder}: no such diffusers folder")
  out: dict[str, tuple[dict, dict]] = {}
  index = folder / "model_index.json"
  if index.is_file():
    out["model_index"] = (_read_json(index), {})
  if components is None:
    if "model_index" in out:
      components = [k for k, v in out["model_index"][0].items()
                    if isinstance(v, list) and v and v[0] is not None]
    else:
      components = [c for c in _DEFAULT_COMPONENTS if (folder / c).is_dir()]
  for name in components:
    sub = folder / name
    if not sub.is_dir():
      raise CheckpointError(f"{folder}: component '{name}' has no folder {sub}")
    if (sub / "scheduler_config.json").is_file():
      out[name] = (_read_json(sub / "scheduler_config.json"), {})
    elif (sub / "config.json").is_file():
      out[name] = (_read_json(sub / "config.json"), load_state_dict(_component_weights(sub, variant)))
    elif name.startswith("tokenizer") or name == "feature_extractor":
      out[name] = ({"path": str(sub)}, {})
    else:
      raise CheckpointError(f"{sub}: neither config.json nor scheduler_config.json found")
  if not out:
    raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json and none of "
                          f"{_DEFAULT_COMPONENTS})")
  return out


# ---------------------------------------------------------------------------------------------------
# CompVis LatentDiffusion state dicts
# ---------------------------------------------------------------------------------------------------

_PREFIXES = {"unet": "model.diffusion_model.", "first_stage": "first_stage_model.",
             "cond_stage": "cond_stage_model."}
_EMA_PREFIX = "model_ema."
# LitEma bookkeeping buffers, which are not weights.
_EMA_META = ("decay", "num_updates")


def split_compvis_state_dict(sd: Mapping[str, np.ndarray], *,
                             use_ema: bool = False) -> dict[str, Any]:
  """Splits a LatentDiffusion state dict by sub-model, prefixes stripped.

  Returns dict(unet, first_stage, cond_stage, ema, extra, scale_factor):
    ema: the UNet weights from the EMA copies (`model_ema.<name without dots>`), keyed like `unet`;
      {} when the checkpoint has none.
    unet: the EMA weights when `use_ema` (UNet buffers without an EMA copy keep their value),
      otherwise the raw weights.
    extra: everything else (schedule buffers, `model_ema.decay`, ...).
    scale_factor: float from the `scale_factor` buffer (scale_by_std models), else None.
  """
  parts: dict[str, dict] = {k: {} for k in _PREFIXES}
  extra, ema_raw = {}, {}
  for key, value in sd.items():
    for part, prefix in _PREFIXES.items():
      if key.startswith(prefix):
        parts[part][key[len(prefix):]] = value
        break
    else:
      short = key[len(_EMA_PREFIX):]
      if key.startswith(_EMA_PREFIX) and short not in _EMA_META:
        ema_raw[short] = value
      elif key != "scale_factor":
        extra[key] = value
  scale = sd.get("scale_factor")
  # LitEma names each parameter of `model` (the DiffusionWrapper) with its dots removed.
  ema_name = {("diffusion_model." + k).replace(".", ""): k for k in parts["unet"]}
  if len(ema_name) != len(parts["unet"]):
    raise CheckpointError("UNet parameter names collide once their dots are removed; cannot map "
                          "the EMA weights back")
  unknown = sorted(set(ema_raw) - set(ema_name))
  if unknown:
    raise CheckpointError(f"{len(unknown)} EMA tensors match no UNet weight, e.g. {unknown[:5]}")
  ema = {ema_name[k]: v for k, v in ema_raw.items()}
  for k, v in ema.items():
    if np.shape(v) != np.shape(parts["unet"][k]):
      raise CheckpointError(f"EMA weight for '{k}' has shape {np.shape(v)}, the UNet weight "
                            f"{np.shape(parts['unet'][k])}")
  unet = parts["unet"]
  if use_ema:
    if not ema:
      raise CheckpointError("use_ema=True but the checkpoint has no 'model_ema.*' weights "
                            "(it was saved without EMA or pruned); load with use_ema=False")
    unet = {**unet, **ema}
  return dict(unet=unet, first_stage=parts["first_stage"], cond_stage=parts["cond_stage"],
              ema=ema, extra=extra, scale_factor=None if scale is None else float(scale))
