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
Every failure raises CheckpointError (a ValueError) whose message names the file; what a hostile
file can and cannot do to these readers is stated in `torch_pickle`'s docstring.
"""

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ldm_jax.convert.checkpoint_limits import brief, guard, read_file
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
# The safetensors library's own header limit; an index file is far smaller still.
_MAX_HEADER, _MAX_INDEX = 100_000_000, 64 << 20


def _parse_json(text: bytes, what: str) -> Any:
  """JSON `text` parsed strictly: UTF-8, no NaN / Infinity, no duplicate keys, nesting bounded by
  the interpreter's recursion limit. Raises CheckpointError starting with `what`."""
  def constant(name):
    raise CheckpointError(f"{what} holds {name}, which is not a JSON number")

  def unique(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
      raise CheckpointError(f"{what} repeats a key in one object")
    return dict(pairs)

  try:
    return json.loads(text.decode("utf-8"), parse_constant=constant, object_pairs_hook=unique)
  except RecursionError:
    raise CheckpointError(f"{what} is nested too deeply") from None
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{what} is not valid JSON ({brief(str(e), 120)})") from None


def _safetensors_entry(name: str, spec, data_size: int) -> tuple[np.dtype, tuple, int, int]:
  """(dtype, shape, start, end) of one header entry, every field checked."""
  if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) \
      or spec["dtype"] not in _SAFETENSORS_DTYPES:
    raise CheckpointError(f"tensor {brief(name)} has header entry {brief(spec)}; expected "
                          f"{{'dtype': one of {sorted(_SAFETENSORS_DTYPES)}, 'shape', "
                          "'data_offsets'}")
  dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
  shape, offsets = spec.get("shape"), spec.get("data_offsets")
  if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) \
      or len(shape) > 64:
    raise CheckpointError(f"tensor {brief(name)} has shape {brief(shape)}; expected a list of "
                          "non-negative ints")
  if not isinstance(offsets, list) or len(offsets) != 2 or \
      not all(type(n) is int for n in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_size:
    raise CheckpointError(f"tensor {brief(name)} has data_offsets {brief(offsets)}; expected "
                          f"[start, end] with 0 <= start <= end <= {data_size} (the size of the "
                          "data section): truncated or corrupt")
  nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
  if nbytes != offsets[1] - offsets[0]:
    raise CheckpointError(f"tensor {brief(name)} of shape {tuple(shape)} and dtype {dtype} needs "
                          f"{nbytes} bytes, its data_offsets {offsets} give "
                          f"{offsets[1] - offsets[0]}: truncated or corrupt")
  return dtype, tuple(shape), offsets[0], offsets[1]


def load_safetensors(path, *, with_metadata: bool = False):
  """Reads a .safetensors file: 8-byte header length, JSON header, then the tensor bytes.

  Tensors are read-only views of the file's bytes, read once; byte ranges must not overlap (each
  byte of the file backs at most one tensor), so nothing is materialised beyond the file.
  Returns {name: array}, or ({name: array}, the header's `__metadata__` {str: str}, {} when
  absent) with `with_metadata`.
  """
  path = check_file(path)
  with guard(path):
    data = read_file(path)
    n = struct.unpack_from("<Q", data)[0] if len(data) >= 8 else -1
    if not 2 <= n <= min(len(data) - 8, _MAX_HEADER):
      raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file "
                            f"{len(data)} B)")
    header = _parse_json(data[8:8 + n], f"{path}: the safetensors header")
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: the safetensors header is {brief(header)}, expected a JSON "
                            "object {name: {dtype, shape, data_offsets}}")
    metadata = header.pop("__metadata__", None) or {}
    if with_metadata and (not isinstance(metadata, dict) or
                          not all(isinstance(v, str) for v in metadata.values())):
      raise CheckpointError(f"{path}: the safetensors __metadata__ is {brief(metadata)}; expected "
                            "a JSON object of strings")
    base, data_size = 8 + n, len(data) - 8 - n
    entries = {name: _safetensors_entry(name, spec, data_size) for name, spec in header.items()}
    ranges = sorted((lo, hi, name) for name, (_, _, lo, hi) in entries.items() if hi > lo)
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
      if start < end:
        raise CheckpointError(f"{path}: tensors {brief(first)} and {brief(second)} overlap in the "
                              "data section; each byte may back one tensor only")
    out = {}
    for name, (dtype, shape, lo, hi) in entries.items():
      raw = np.frombuffer(data, np.uint8, hi - lo, base + lo)
      out[name] = to_native(raw, dtype, big_endian=False).reshape(shape)
    return (out, metadata) if with_metadata else out


_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _flat_state_dict(obj, path) -> dict[str, np.ndarray]:
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # Lightning: weights live under "state_dict"
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, np.ndarray):
      raise CheckpointError(f"{path}: entry {brief(k)} is a {type(v).__name__}, expected a "
                            "flat {name: tensor} state dict (or one under 'state_dict')")
  return dict(obj)


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Flat {name: array} from .ckpt/.pt/.pth/.bin, .safetensors or a sharded *.index.json."""
  path = check_file(path)
  with guard(path):
    name = path.name.lower()
    if name.endswith(".index.json") or (name.endswith(".json") and ".index." in name):
      return _load_sharded(path)
    return _load_weights(path)


def _load_weights(path: Path) -> dict[str, np.ndarray]:
  """One weights file (never an index, so shards cannot refer to other indexes or themselves)."""
  name = path.name.lower()
  if name.endswith(".safetensors"):
    return load_safetensors(path)
  if name.endswith(_TORCH_SUFFIXES):
    return _flat_state_dict(load_torch_checkpoint(path), path)
  raise CheckpointError(f"{path}: unrecognised checkpoint extension; expected one of "
                        f"{_TORCH_SUFFIXES + ('.safetensors', '.index.json')}")


def _load_sharded(index_path: Path) -> dict[str, np.ndarray]:
  index = _parse_json(read_file(index_path, _MAX_INDEX), f"{index_path}: the index")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index_path}: not a sharded-weights index (expected a JSON object "
                          "with a 'weight_map' {tensor name: shard file name})")
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    # Shards sit beside the index and are weights files: no paths, no index files (itself or
    # another), so loading cannot recurse or leave the folder.
    if Path(shard).name != shard or shard in (".", "..") or \
        not shard.lower().endswith(_TORCH_SUFFIXES + (".safetensors",)):
      raise CheckpointError(f"{index_path}: shard {brief(shard)} is not the name of a "
                            ".safetensors / .bin file in this folder")
    shard_path = check_file(index_path.parent / shard)
    for key, value in _load_weights(shard_path).items():
      if key in out:
        raise CheckpointError(f"{index_path}: tensor {brief(key)} is in more than one shard "
                              f"(again in {shard})")
      out[key] = value
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
  with guard(path):
    config = _parse_json(read_file(path, _MAX_INDEX), f"{path}:")
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: holds {brief(config)}, expected a JSON object")
  return config


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
    # model_index.json names the components: sub-folders only, never a path out of the folder.
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
      raise CheckpointError(f"{folder}: component {brief(name)} is not a sub-folder name")
    sub = folder / name
    if not sub.is_dir():
      raise CheckpointError(f"{folder}: component '{name}' has no folder {sub}")
    if (sub / "scheduler_config.json").is_file():
      out[name] = (_read_json(sub / "scheduler_config.json"), {})
    elif (sub / "config.json").is_file():
      weights = load_state_dict(_component_weights(sub, variant))
      out[name] = (_read_json(sub / "config.json"), weights)
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
  if scale is not None and (not isinstance(scale, np.ndarray) or scale.size != 1
                            or scale.dtype.kind not in "iuf"):
    raise CheckpointError(f"the 'scale_factor' buffer is {brief(scale)} of shape "
                          f"{np.shape(scale)}; expected a single number")
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
