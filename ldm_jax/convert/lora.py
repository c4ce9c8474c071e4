"""LoRA files applied to a model's UNet and CLIP text encoder: read, match, merge.

Two community layouts of `.safetensors` files are read:
  * diffusers / PEFT: `unet.<module>.lora_A.weight` [r, in, *k] and `.lora_B.weight` [out, r, *1]
    (also `lora_down` / `lora_up`), `text_encoder.<module>...` for the text encoder, an optional
    `<module>.alpha`; `<module>` is the diffusers / transformers module name. The PEFT config that
    diffusers' `save_lora_weights` writes into the header (`lora_adapter_metadata`: lora_alpha,
    alpha_pattern, use_rslora per component) sets the alphas of modules without an `.alpha` key.
  * Kohya: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and `lora_te_...`,
    where `<module>` is the same name with every `.` written `_` (diffusers or CompVis UNet names).
Conv LoRA on a 3x3 kernel has a `down` of the kernel's shape [r, in, 3, 3] and a 1x1 `up`.

The update of a weight W is W + scale * (alpha / r) * up @ down (alpha / sqrt(r) for rsLoRA),
alpha = r when the file gives none (what diffusers assumes for PEFT files without metadata). A
module name is matched to our parameter through the importers' own key maps (`convert.unet.key_map`,
`convert.text.clip_hf_key_map`), so a LoRA key lands on exactly the parameter its base weight was
imported into. Keys that match nothing, incomplete pairs and shape mismatches raise one
`LoraError` naming the file and listing them: nothing in a file is dropped silently.

`merge` adds the updates into a parameter tree (numpy, for saving or sampling); `deltas` + `apply`
keep them apart, so `jax.jit(apply)` takes the scales as traced values and a new scale reuses the
compiled program.

Trained adapters (ldm_jax/train/lora.py) live in our layout, one {down, up} pair per kernel
(`adapter_deltas`); `from_adapters` turns them into the `LoraFile` a file holding them would read
as, through `module_names` (the `targets` map read the other way), and `write` saves that file in
either layout, so a written file reads back to the same updates.
"""

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert import text as text_convert
from ldm_jax.convert import torch_io
from ldm_jax.convert import unet as unet_convert
from ldm_jax.models import build

Path = tuple[str, ...]
# The parameter-tree components a LoRA file may touch, by the prefixes naming them in each layout.
UNET, TEXT = "unet", "cond_stage"
_DIFFUSERS_PREFIXES = {"unet.": UNET, "text_encoder.": TEXT}
_KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT}
# Leaf suffix -> role, in both layouts.
_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
          ".lora_up.weight": "up", ".alpha": "alpha"}
_TEXT_KINDS = ("clip", "openclip")  # CLIPTextEncoder, loaded by transformers names either way


class LoraError(common.WeightLoadError):
  """A LoRA file that does not fit the model; the message names the file and the keys."""


@dataclasses.dataclass(frozen=True)
class Update:
  """One low-rank update of one parameter, as read from a file (torch layout)."""
  component: str   # UNET or TEXT
  path: Path       # the parameter inside params[component]['params']
  module: str      # the module's name in the file, for messages
  down: np.ndarray  # [r, in, *k]
  up: np.ndarray    # [out, r, *1]
  scaling: float    # alpha / r, or alpha / sqrt(r) for rsLoRA
  transform: Callable[[np.ndarray], np.ndarray]  # torch weight layout -> ours (the importer's)

  def delta(self) -> np.ndarray:
    """scaling * up @ down in our parameter layout, float32."""
    r = self.down.shape[0]
    down = np.asarray(self.down, np.float32).reshape(r, -1)  # [r, in * k]
    up = np.asarray(self.up, np.float32).reshape(self.up.shape[0], r)  # [out, r]
    w = (up @ down).reshape((self.up.shape[0],) + tuple(self.down.shape[1:]))  # [out, in, *k]
    return np.asarray(self.transform(w * np.float32(self.scaling)))


@dataclasses.dataclass(frozen=True)
class LoraFile:
  path: str
  updates: tuple[Update, ...]
  # Keys of modules the model has but never runs (the last CLIP block of a 'penultimate' encoder,
  # which SD 2.x LoRA files do train): they cannot change an output, and are listed here.
  unused: tuple[str, ...] = ()


def parse_spec(spec: str) -> tuple[str, float]:
  """'FILE[:SCALE]' -> (file, scale); a suffix that is not a number belongs to the file name."""
  head, sep, tail = spec.rpartition(":")
  if sep and head:
    try:
      scale = float(tail)
    except ValueError:
      return spec, 1.0
    if not math.isfinite(scale):
      raise ValueError(f"--lora {spec}: scale {tail!r} is not finite; expected a number.")
    return head, scale
  return spec, 1.0


def _as_json(section: Any) -> str:
  """A config section as canonical JSON: the key of the name caches below."""
  def plain(value):  # ConfigDicts at any depth (a dict of a ConfigDict's items holds some)
    return value.to_dict() if hasattr(value, "to_dict") else str(value)
  return json.dumps(section, sort_keys=True, default=plain)


def _unet_kernels(config: Mapping[str, Any], diffusers: bool) -> dict[Path, tuple[str, Callable]]:
  """UNet kernel path -> (torch module name, transform), in the diffusers or the CompVis naming."""
  return dict(_unet_kernels_of(_as_json(config["unet"]), diffusers))


@functools.lru_cache(maxsize=8)
def _unet_kernels_of(unet_json: str, diffusers: bool) -> dict[Path, tuple[str, Callable]]:
  # Cached: the key map traces the UNet's init, and every file (or export) of a model asks again.
  unet = build.build_unet(json.loads(unet_json))
  out = {}
  for path, (key, transform) in unet_convert.key_map(unet, diffusers=diffusers).items():
    if path[-1] == "kernel" and key.endswith(".weight"):
      out[path] = (key[:-len(".weight")], transform)
  return out


def _text_kernels(config: Mapping[str, Any]) -> tuple[dict[Path, tuple[str, Callable]], list[str]]:
  """(CLIP kernel path -> (transformers module name without `text_model.`, transform), the module
  names of blocks that are never run); empty without a CLIP text encoder."""
  cond = dict(config.get("cond_stage") or {})
  if cond.get("kind") not in _TEXT_KINDS:
    return {}, []
  kernels, unused = _text_kernels_of(_as_json(cond))
  return dict(kernels), list(unused)


@functools.lru_cache(maxsize=8)
def _text_kernels_of(cond_json: str) -> tuple[dict[Path, tuple[str, Callable]], list[str]]:
  encoder = build.build_cond_stage(json.loads(cond_json))
  kernels = {path: (key[:-len(".weight")], transform)
             for path, (key, transform) in text_convert.clip_hf_key_map(encoder).items()
             if path[-1] == "kernel"}
  unused = [f"encoder.layers.{layer}.{module}" for layer in range(encoder.num_blocks, encoder.layers)
            for module in text_convert.CLIP_HF_BLOCK_MODULES]
  return kernels, unused


def targets(config: Mapping[str, Any]) -> dict[str, dict[str, tuple[Path, Callable] | None]]:
  """component -> {torch module name: (our kernel path, transform)} for the model `config` builds.

  The UNet answers to its diffusers and its CompVis names, the CLIP text encoder to its
  transformers names with and without the `text_model.` level; the modules of a text block that
  is never run (output_layer='penultimate') map to None.
  """
  out: dict[str, dict[str, tuple[Path, Callable]]] = {UNET: {}, TEXT: {}}
  for diffusers in (True, False):
    for path, (name, transform) in _unet_kernels(config, diffusers).items():
      out[UNET][name] = (path, transform)
  kernels, unused = _text_kernels(config)
  for path, (name, transform) in kernels.items():
    out[TEXT][name] = out[TEXT]["text_model." + name] = (path, transform)
  for name in unused:
    out[TEXT][name] = out[TEXT]["text_model." + name] = None
  return out


def module_names(config: Mapping[str, Any]) -> dict[str, dict[Path, tuple[str, Callable]]]:
  """component -> {our kernel path: (module name as diffusers writes it, transform)}: `targets`
  read the other way, for writing files (UNet: diffusers names; text encoder: `text_model.*`)."""
  kernels, _ = _text_kernels(config)
  return {UNET: _unet_kernels(config, diffusers=True),
          TEXT: {path: ("text_model." + name, t) for path, (name, t) in kernels.items()}}


def _split_key(key: str) -> tuple[str, str, str, bool] | None:
  """A file key -> (component, module name, role, kohya) or None when it is no LoRA key."""
  for prefixes, kohya in ((_KOHYA_PREFIXES, True), (_DIFFUSERS_PREFIXES, False)):
    for prefix, component in prefixes.items():
      if not key.startswith(prefix):
        continue
      for suffix, role in _ROLES.items():
        if key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
          module = key[len(prefix):-len(suffix)]
          if not kohya and module.startswith("base_model.model."):  # PEFT's wrapper levels
            module = module[len("base_model.model."):]
          return component, module, role, kohya
  return None


def _peft_configs(path: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """component -> the PEFT LoraConfig fields diffusers saved for it in the file's header."""
  raw = metadata.get("lora_adapter_metadata")
  if raw is None:
    return {}
  try:
    fields = json.loads(raw)
  except ValueError:
    fields = None
  if not isinstance(fields, dict):
    raise LoraError(f"{path}: the header's lora_adapter_metadata is not a JSON object; expected "
                    f"the PEFT config that diffusers' save_lora_weights writes.")
  out: dict[str, dict[str, Any]] = {}
  for key, value in fields.items():
    for prefix, component in _DIFFUSERS_PREFIXES.items():
      if key.startswith(prefix):
        out.setdefault(component, {})[key[len(prefix):]] = value
  for component, cfg in out.items():
    patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
      raise LoraError(f"{path}: lora_adapter_metadata's {component} alpha_pattern is "
                      f"{type(patterns).__name__}; expected an object {{pattern: alpha}}.")
    try:
      for pattern in patterns:
        re.compile(pattern)
    except (re.error, TypeError):
      raise LoraError(f"{path}: lora_adapter_metadata's {component} alpha_pattern "
                      f"{list(patterns)} holds an invalid regular expression.") from None
    alphas = [cfg.get("lora_alpha")] + list(patterns.values())
    if not all(a is None or (isinstance(a, (int, float)) and math.isfinite(a)) for a in alphas):
      raise LoraError(f"{path}: lora_adapter_metadata gives {component} the alphas {alphas}; "
                      f"expected finite numbers.")
  return out


def _peft_alpha(cfg: Mapping[str, Any], module: str, rank: int) -> float:
  """The alpha PEFT gives `module`: the first alpha_pattern entry naming it (a regex matched
  against the module name's tail, as PEFT does), else lora_alpha, else the rank."""
  for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return float(alpha)
  return float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(rank)


def read(path: str, config: Mapping[str, Any]) -> LoraFile:
  """Reads a LoRA .safetensors file and matches every key to the model `config` describes.

  Raises torch_io.CheckpointError for an unreadable file and LoraError listing every key that
  matches nothing, every module without both factors and every factor pair of inconsistent shapes.
  """
  state, metadata = torch_io.load_safetensors(path, with_metadata=True)
  peft_configs = _peft_configs(path, metadata)
  names = targets(config)
  kohya_names = {c: {m.replace(".", "_"): v for m, v in t.items()} for c, t in names.items()}
  groups: dict[tuple[str, str, bool], dict[str, tuple[str, np.ndarray]]] = {}
  unmatched, problems = [], []
  for key in sorted(state):
    split = _split_key(key)
    if split is None:
      unmatched.append(f"{key}  (not a LoRA key of either layout)")
      continue
    component, module, role, kohya = split
    group = groups.setdefault((component, module, kohya), {})
    if role in group:  # e.g. lora_A and lora_down for one module: which one is meant is unknown
      problems.append(f"{group[role][0]}, {key}: two tensors for the {role} factor of one module")
      continue
    group[role] = (key, state[key])
  updates, unused = [], []
  for (component, module, kohya), parts in sorted(groups.items()):
    keys = sorted(k for k, _ in parts.values())
    known = (kohya_names if kohya else names)[component]
    target = known.get(module)
    if module in known and target is None:
      unused += keys
      continue
    if target is None:
      where = ("the UNet" if component == UNET else
               "the text encoder" if names[TEXT] else "a model without a CLIP text encoder")
      unmatched += [f"{k}  (no module {module!r} in {where})" for k in keys]
      continue
    if "down" not in parts or "up" not in parts:
      missing = "up" if "down" in parts else "down"
      problems.append(f"{', '.join(keys)}: the {missing} factor is missing")
      continue
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    if down.ndim not in (2, 3, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
        any(d != 1 for d in up.shape[2:]):
      problems.append(f"{down_key} {tuple(down.shape)} / {up_key} {tuple(up.shape)}: expected "
                      f"down [r, in, *kernel] and up [out, r, 1...] of the same rank")
      continue
    rank = down.shape[0]
    peft_config = {} if kohya else peft_configs.get(component, {})
    alpha = _peft_alpha(peft_config, module, rank)
    if "alpha" in parts:
      alpha_key, value = parts["alpha"]
      if np.size(value) != 1 or not np.isfinite(np.asarray(value, np.float64)).all():
        problems.append(f"{alpha_key}: {np.asarray(value).ravel()[:4]} of shape "
                        f"{tuple(np.shape(value))}; expected one finite number")
        continue
      alpha = float(np.asarray(value, np.float64).reshape(()))
    path_, transform = target
    scaling = alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)
    updates.append(Update(component, path_, module, down, up, scaling, transform))
  if unmatched or problems:
    parts_ = [f"{path}: the LoRA file does not fit the model ({len(state)} tensors, "
              f"{len(updates)} modules matched)."]
    if unmatched:
      parts_.append(common.summarise("keys that match nothing", unmatched))
    if problems:
      parts_.append(common.summarise("unusable factors", problems))
    raise LoraError("\n".join(parts_))
  if not updates:
    raise LoraError(f"{path}: no LoRA tensors in the file; expected lora_A/lora_B or "
                    f"lora_down/lora_up keys.")
  return LoraFile(path, tuple(updates), tuple(unused))


def deltas(params: Mapping[str, Any], loras: Sequence[LoraFile]
           ) -> list[dict[str, dict[Path, np.ndarray]]]:
  """Per file, {component: {path: delta in our layout}}, each checked against the parameter's shape
  in `params` ({'unet': {'params': ...}, 'cond_stage': {'params': ...}, ...})."""
  out, problems = [], []
  for lora in loras:
    per_file: dict[str, dict[Path, np.ndarray]] = {}
    for u in lora.updates:
      flat = common.flatten(params.get(u.component, {}).get("params", {}))
      base = flat.get(u.path)
      delta = u.delta()
      if base is None or tuple(delta.shape) != tuple(np.shape(base)):
        have = "absent" if base is None else tuple(np.shape(base))
        problems.append(f"{lora.path}: {u.module}: the update has shape {tuple(delta.shape)} in "
                        f"our layout, the parameter {u.component}/{'/'.join(u.path)} is {have}")
        continue
      per_file.setdefault(u.component, {})[u.path] = delta
    out.append(per_file)
  if problems:
    raise LoraError("LoRA updates of the wrong shape:\n" + common.summarise("mismatches", problems))
  return out


def apply(params: Mapping[str, Any], deltas_: Sequence[Mapping[str, Mapping[Path, Any]]],
          scales) -> dict[str, Any]:
  """params with sum_i scales[i] * deltas_[i] added; pure jnp, so jit-able with traced scales.

  Only the updated leaves are new arrays; the others are the input's. Compute is in float32, the
  result keeps each parameter's dtype.
  """
  out = dict(params)
  touched: dict[str, dict[Path, Any]] = {}
  for i, per_file in enumerate(deltas_):
    for component, updates in per_file.items():
      if component not in touched:
        touched[component] = common.flatten(params[component]["params"])
      flat = touched[component]
      for path, delta in updates.items():
        base = flat[path]
        flat[path] = (jnp.asarray(base, jnp.float32) + scales[i] * jnp.asarray(delta)
                      ).astype(base.dtype)
  for component, flat in touched.items():
    out[component] = dict(params[component], params=common.unflatten(flat))
  return out


def merge(params: Mapping[str, Any], loras: Sequence[tuple[LoraFile, float]]) -> dict[str, Any]:
  """params with every (file, scale) merged in, as numpy arrays (for saving or sampling)."""
  ds = deltas(params, [lora for lora, _ in loras])
  out = dict(params)
  for component in {c for d in ds for c in d}:
    flat = common.flatten(params[component]["params"])
    for d, (_, scale) in zip(ds, loras):
      for path, delta in d.get(component, {}).items():
        base = flat[path]
        flat[path] = (np.asarray(base, np.float32) + np.float32(scale) * delta
                      ).astype(np.asarray(base).dtype)
    out[component] = dict(params[component], params=common.unflatten(flat))
  return out


def merge_files(config: Mapping[str, Any], params: Mapping[str, Any],
                specs: Sequence[str], reader: Callable[..., LoraFile] | None = None
                ) -> dict[str, Any]:
  """`merge` for 'FILE[:SCALE]' command-line values, in order; `reader(path, config)` reads one
  (default `read`)."""
  loras = []
  for spec in specs:
    path, scale = parse_spec(spec)
    lora = (reader or read)(path, config)
    if lora.unused:
      print(f"{path}: {len(lora.unused)} tensors adapt a text block this model never runs "
            f"(output_layer='penultimate'), e.g. {lora.unused[0]}; they change nothing.")
    loras.append((lora, scale))
  return merge(params, loras)


# ------------------------------------------------------------------------------------------------
# Adapters in our layout (what training optimises), and writing them as LoRA files.
# ------------------------------------------------------------------------------------------------
# An adapter tree is {component: nested dict like params[component]['params'], where each adapted
# kernel K [*lead, out] is replaced by {'down': [*lead, r], 'up': [r, out]}}, so that
# K + scaling * down . up (contracting r) is the adapted kernel: a Dense kernel [in, out] gets down
# [in, r], a 3x3 conv kernel [3, 3, in, out] gets down [3, 3, in, r] and a 1x1 `up`.
DOWN, UP = "down", "up"
LAYOUTS = ("peft", "kohya")


def adapter_factors(adapters: Mapping[str, Any]) -> dict[str, dict[Path, tuple[Any, Any]]]:
  """{component: {kernel path: (down, up)}} of an adapter tree."""
  out: dict[str, dict[Path, tuple[Any, Any]]] = {}
  for component, tree in adapters.items():
    flat = common.flatten(tree)
    pairs = out.setdefault(component, {})
    for path in sorted({p[:-1] for p in flat}):
      pairs[path] = (flat[path + (DOWN,)], flat[path + (UP,)])
  return out


def adapter_deltas(adapters: Mapping[str, Any]) -> dict[str, dict[Path, Any]]:
  """{component: {kernel path: down . up}} (unscaled, kernel-shaped, float32); pure jnp, so it runs
  under jit and gradients reach both factors. `apply(params, [this], [scaling])` adapts params."""
  return {component: {path: jnp.tensordot(jnp.asarray(down, jnp.float32),
                                          jnp.asarray(up, jnp.float32), 1)
                      for path, (down, up) in pairs.items()}
          for component, pairs in adapter_factors(adapters).items()}


def _torch_factors(down: np.ndarray, up: np.ndarray, transform: Callable, what: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Our factors of one kernel -> (down [r, in, *k], up [out, r, *1]) in the torch layout of the
  module's weight, found as the layout whose `transform` (the importer's) gives our kernel shape."""
  down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
  (r, out), lead = up.shape, down.shape[:-1]
  if len(lead) == 3:  # conv [kh, kw, in, out] <- torch [out, in, kh, kw]
    candidates = [(np.transpose(down, (3, 2, 0, 1)), up.T[:, :, None, None])]
  else:  # Dense [in, out] <- torch linear [out, in], 1x1 conv [out, in, 1, 1] or conv1d [out, in, 1]
    candidates = [(down.T.reshape((r, lead[0]) + (1,) * n), up.T.reshape((out, r) + (1,) * n))
                  for n in (0, 2, 1)]
  for d, u in candidates:
    weight_shape = (out,) + d.shape[1:]
    if tuple(np.shape(transform(np.zeros(weight_shape, np.float32)))) == lead + (out,):
      return d, u
  raise LoraError(f"{what}: no torch weight layout gives a kernel of shape {lead + (out,)}.")


def from_adapters(config: Mapping[str, Any], adapters: Mapping[str, Any], scaling: float,
                  path: str) -> LoraFile:
  """An adapter tree of the model `config` describes, as the `LoraFile` a file holding it would
  read as (torch layout, module names), so `merge` and `write` take trained adapters too."""
  names = module_names(config)
  updates, unknown = [], []
  for component, pairs in adapter_factors(adapters).items():
    for kernel, (down, up) in pairs.items():
      named = names.get(component, {}).get(kernel)
      if named is None:
        unknown.append(f"{component}/{'/'.join(kernel)}")
        continue
      module, transform = named
      d, u = _torch_factors(down, up, transform, f"{path}: {module}")
      updates.append(Update(component, kernel, module, d, u, float(scaling), transform))
  if unknown:
    raise LoraError(f"{path}: adapters of kernels the model has no LoRA module name for:\n"
                    + common.summarise("kernels", unknown))
  return LoraFile(path, tuple(updates))


def file_tensors(lora: LoraFile, layout: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, header metadata) of `lora` as a .safetensors file in the diffusers/PEFT layout
  (alphas in diffusers' `lora_adapter_metadata`) or the Kohya layout (an `.alpha` per module)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}.")
  prefixes = {c: p for p, c in (_DIFFUSERS_PREFIXES if layout == "peft" else
                                _KOHYA_PREFIXES).items()}
  tensors: dict[str, np.ndarray] = {}
  peft: dict[str, dict[str, Any]] = {}
  for u in lora.updates:
    rank = u.down.shape[0]
    alpha = u.scaling * rank
    down, up = (np.ascontiguousarray(np.asarray(x, np.float32)) for x in (u.down, u.up))
    if layout == "kohya":
      name = prefixes[u.component] + u.module.replace(".", "_")
      tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": np.asarray(alpha, np.float32)})
      continue
    name = prefixes[u.component] + u.module
    tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    # One PEFT config per component: the first module's rank and alpha, patterns for the others.
    cfg = peft.setdefault(u.component, {"r": rank, "lora_alpha": alpha, "target_modules": [],
                                        "rank_pattern": {}, "alpha_pattern": {},
                                        "use_rslora": False})
    cfg["target_modules"].append(u.module)
    if rank != cfg["r"]:
      cfg["rank_pattern"][re.escape(u.module)] = rank
    if alpha != cfg["lora_alpha"]:
      cfg["alpha_pattern"][re.escape(u.module)] = alpha
  metadata = {"format": "pt"}
  if peft:
    metadata["lora_adapter_metadata"] = json.dumps(
        {f"{prefixes[c]}{k}": v for c, cfg in peft.items() for k, v in cfg.items()})
  return tensors, metadata


def write(path: str, lora: LoraFile, layout: str = "peft") -> None:
  """Writes `lora` to the .safetensors file `path` (see `file_tensors`); a reader sees the old file
  or the whole new one: the tensors go to a temporary file in the same directory, renamed last."""
  import safetensors.numpy  # Local: only writers need it.
  tensors, metadata = file_tensors(lora, layout)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
