"""Loading models for inference, and saving them: saved model directories and training workdirs.

What it reads (the names are `workdir_layout`'s):

  * a saved model directory: config.json (checked field by field) + params/ (Orbax);
  * a stage-2 training workdir: its model/ directory, with the trained parts replaced by the newest
    complete checkpoint's EMA (or raw) weights;
  * a stage-1 (autoencoder) workdir: first_stage.json + the newest checkpoint's autoencoder;
  * a CompVis first stage (.ckpt + its YAML), for evaluating the zoo's autoencoders.

Readers open checkpoints read-only: they create, delete and rename nothing, so they are safe while
a trainer is saving into the same workdir. Every load is checked leaf by leaf against the shapes
the config implies. Mistakes raise `ldm_jax.errors` types naming the path.
"""

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
import yaml

from ldm_jax import networks
from ldm_jax import workdir_layout as layout
from ldm_jax.convert import autoencoder as ae_convert
from ldm_jax.convert import common
from ldm_jax.convert import compvis_config
from ldm_jax.convert import torch_io
from ldm_jax.models import build
# pylint: disable-next=unused-import
from ldm_jax.errors import CheckpointNotFoundError, CheckpointRestoreError, ConfigError

MODEL_SUBDIR = layout.MODEL_DIR  # The name the trainer and older callers use.

log = logging.getLogger("ldm_jax")


# Fields of a saved config.json checked before anything is built from it: (section path, field,
# kind, required). Kinds: 'dict', 'str', 'pos_int', 'pos_ints' (non-empty list of positive ints),
# 'pos_int_or_ints', 'pos_int_or_none', 'pos_number' (finite, > 0), 'number' (finite).
_CONFIG_FIELDS = (
    ((), "first_stage", "dict", True),
    ((), "unet", "dict", True),
    ((), "cond_stage", "dict_or_none", False),
    ((), "diffusion", "dict", False),
    (("first_stage",), "kind", "str", True),
    (("first_stage",), "kwargs", "dict", True),
    (("first_stage", "kwargs"), "ch_mult", "pos_ints", True),
    (("first_stage", "kwargs"), "embed_dim", "pos_int", True),
    (("first_stage", "kwargs"), "ch", "pos_int", False),
    (("first_stage", "kwargs"), "z_channels", "pos_int", False),
    (("first_stage", "kwargs"), "in_channels", "pos_int", False),
    (("first_stage", "kwargs"), "out_ch", "pos_int", False),
    (("first_stage", "kwargs"), "resolution", "pos_int", False),
    (("first_stage", "kwargs"), "num_res_blocks", "pos_int", False),
    (("first_stage", "kwargs"), "n_embed", "pos_int_or_none", False),
    (("unet",), "in_channels", "pos_int", True),
    (("unet",), "model_channels", "pos_int", True),
    (("unet",), "out_channels", "pos_int", True),
    (("unet",), "num_res_blocks", "pos_int_or_ints", True),
    (("unet",), "channel_mult", "pos_ints", False),
    (("unet",), "context_dim", "pos_int_or_none", False),
    (("cond_stage",), "kind", "str", False),
    (("cond_stage",), "kwargs", "dict", False),
    (("diffusion",), "image_size", "pos_int", False),
    (("diffusion",), "timesteps", "pos_int", False),
    (("diffusion",), "channels", "pos_int", False),
    (("diffusion",), "scale_factor", "pos_number", False),
    (("diffusion",), "linear_start", "number", False),
    (("diffusion",), "linear_end", "number", False),
)

_EXPECTED = {"dict": "an object", "dict_or_none": "an object or null", "str": "a string",
             "pos_int": "a positive integer", "pos_ints": "a non-empty list of positive integers",
             "pos_int_or_ints": "a positive integer or a non-empty list of them",
             "pos_int_or_none": "a positive integer or null",
             "pos_number": "a finite number > 0", "number": "a finite number"}


def _is_pos_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_pos_ints(v) -> bool:
  return isinstance(v, list) and bool(v) and all(_is_pos_int(x) for x in v)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_FITS = {"dict": lambda v: isinstance(v, dict),
         "dict_or_none": lambda v: v is None or isinstance(v, dict),
         "str": lambda v: isinstance(v, str),
         "pos_int": _is_pos_int,
         "pos_ints": _is_pos_ints,
         "pos_int_or_ints": lambda v: _is_pos_int(v) or _is_pos_ints(v),
         "pos_int_or_none": lambda v: v is None or _is_pos_int(v),
         "pos_number": lambda v: _is_number(v) and v > 0,
         "number": _is_number}


def check_config_json(config: Any, cfg_path: str) -> None:
  """Raises ConfigError naming the first field of a loaded config.json that cannot build a model.

  Checks types and signs only (sections are objects, sizes positive integers, the scale factor a
  positive finite number); whether the shapes fit the weights is `check_against_config`'s job.
  """
  if not isinstance(config, dict):
    raise ConfigError(f"{cfg_path}: the top level is {type(config).__name__} "
                      f"{json.dumps(config)[:80]}; expected an object with first_stage, unet, "
                      f"cond_stage and diffusion.")
  for section, field, kind, required in _CONFIG_FIELDS:
    parent = config
    for name in section:
      parent = parent.get(name) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
      continue  # An optional section that is absent (a present one was checked already).
    name = ".".join(section + (field,))
    if field not in parent:
      if required:
        raise ConfigError(f"{cfg_path}: {name} is missing; expected {_EXPECTED[kind]}.")
      continue
    if not _FITS[kind](parent[field]):
      raise ConfigError(f"{cfg_path}: {name} = {json.dumps(parent[field])[:80]}; expected "
                        f"{_EXPECTED[kind]}.")


def _flat_str(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {"/".join(k): v for k, v in common.flatten(tree).items()}


def check_against_config(config, params: Mapping[str, Any], what: str) -> dict[str, Any]:
  """Returns params as numpy after checking every leaf against the config's shapes (or raises)."""
  template = jax.eval_shape(lambda: networks.init_params(config, jax.random.PRNGKey(0)))
  flat = _flat_str(params)
  return common.strict_load(template, flat, lambda path: ("/".join(path), common.identity),
                            what=what)


def write_text_atomic(path: str, text: str) -> None:
  """Writes `path` so that readers see the old file or the whole new one, never a part.

  A temporary file in the same directory, flushed to disk, then renamed over `path` (the rename is
  atomic on POSIX filesystems); on failure the temporary file is removed and `path` is untouched.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  try:  # The rename itself survives a power cut once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  except OSError:  # Some filesystems cannot fsync a directory; the data file is on disk already.
    pass
  finally:
    os.close(dir_fd)


def save_model(path: str, config, params: Mapping[str, Any], *,
               replace_incomplete: bool = False) -> None:
  """Writes the parameters, then config.json; refuses to overwrite an existing model directory.

  replace_incomplete: a directory holding params/ but no config.json is what a save interrupted
  between its two writes leaves; with this set (the trainer, which re-derives the same model)
  those parameters are removed and written again, else FileExistsError says what was found.
  """
  path = os.path.abspath(path)
  params_dir = layout.params_dir(path)
  leftovers = [os.path.join(path, n) for n in (os.listdir(path) if os.path.isdir(path) else [])
               if n.startswith(layout.PARAMS_DIR)]  # params/ and Orbax's params.orbax-checkpoint-tmp-*
  if leftovers:
    if os.path.isfile(layout.config_path(path)):
      raise FileExistsError(f"{path} already holds a saved model; choose a new directory.")
    if not replace_incomplete:
      raise FileExistsError(
          f"{path} holds parameters without config.json (an interrupted save?): "
          f"{sorted(os.path.basename(p) for p in leftovers)}; remove them or choose a new "
          f"directory.")
    log.warning("%s: parameters without config.json (a save was interrupted): writing the model "
                "again.", path)
    for leftover in leftovers:
      if os.path.isdir(leftover):
        shutil.rmtree(leftover)
      else:
        os.remove(leftover)
  os.makedirs(path, exist_ok=True)
  config = ml_collections.ConfigDict(dict(config))
  params = jax.tree_util.tree_map(np.asarray, dict(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, params)
    ckptr.wait_until_finished()
  # config.json last: its presence marks a complete directory.
  write_text_atomic(layout.config_path(path),
                    config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(path: str) -> ml_collections.ConfigDict:
  """The checked config.json of a saved model directory (ConfigError if malformed)."""
  cfg_path = layout.config_path(path)
  try:
    with open(cfg_path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise CheckpointNotFoundError(f"{path}: no config.json (not a saved ldm_jax model).") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start}); expected "
                      f"UTF-8 JSON.") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
  check_config_json(config, cfg_path)
  return ml_collections.ConfigDict(config)


def load_saved_model(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  config = read_config(path)
  params_dir = layout.params_dir(os.path.abspath(path))
  if not os.path.isdir(params_dir):
    raise CheckpointNotFoundError(f"{path}: no params/ directory next to config.json.")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      params = ckptr.restore(params_dir)
    except Exception as e:  # Orbax raises many types for damaged directories.
      raise ValueError(f"{params_dir}: cannot read the saved parameters ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}).") from None
  tok = config.get("cond_stage", {}).get("tokenizer", {})
  if tok and tok.get("path") and not os.path.isabs(tok["path"]):
    config.cond_stage.tokenizer.path = os.path.join(os.path.abspath(path), tok["path"])
  return config, check_against_config(config, params, what=f"model at {path}")


def load_model(path: str, *, use_ema: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """A saved model directory, or a training workdir (newest checkpoint, EMA weights by default)."""
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f"{path}: no such file or directory.")
  if layout.is_saved_model(path):
    return load_saved_model(path)
  model_dir = layout.model_dir(path)
  if os.path.isfile(layout.lora_path(path)):
    # A LoRA run keeps adapters only, not a model: they apply on top of the base they were trained on.
    try:
      with open(layout.lora_path(path)) as f:
        base = json.load(f).get("base", "?")
    except (OSError, ValueError, AttributeError):
      base = "?"
    raise CheckpointNotFoundError(
        f"{path}: the workdir of a LoRA training run (adapters only); expected a model: pass the "
        f"base it was trained on ({base}) as the checkpoint and this workdir as --lora.")
  if not os.path.isfile(layout.config_path(model_dir)):
    raise CheckpointNotFoundError(
        f"{path}: neither a saved model (config.json + params/) nor a training workdir "
        f"(model/ + checkpoints/).")
  config, params = load_saved_model(model_dir)
  trained = restore_trained_params(path, use_ema=use_ema)
  if trained is not None:
    merged = dict(params)
    merged.update({k: v for k, v in trained.items() if k in params})
    params = check_against_config(config, merged, what=f"training workdir {path}")
  return config, params


# ------------------------------------------------------------------------------------------------
# Training checkpoints, read-only.
# ------------------------------------------------------------------------------------------------
def complete_steps(workdir: str) -> list[int]:
  """The workdir's finished checkpoint steps, oldest first ([] without checkpoints/).

  A step is finished once Orbax has written its done-file; saves in flight live in
  `<step>.orbax-checkpoint-tmp-*` directories, which are not digits and are never listed.
  """
  root = epath.Path(layout.checkpoints_dir(workdir))
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / layout.STEP_DONE_FILE).exists()
                and (p / layout.STATE_ITEM).is_dir())


def read_newest_state(workdir: str) -> dict[str, Any] | None:
  """The newest readable checkpoint's training state as saved (nested dicts of numpy arrays), or
  None when the workdir has no finished checkpoint.

  A step that cannot be read is logged and the next older one is tried; CheckpointRestoreError
  when none can. Nothing in the workdir is created, removed or renamed (the trainer alone sets
  unreadable steps aside when it resumes).
  """
  failures = []
  for step in reversed(complete_steps(workdir)):
    # Orbax takes absolute paths only; workdirs are often given relative to the current directory.
    state_dir = (epath.Path(os.path.abspath(layout.checkpoints_dir(workdir))) / str(step) /
                 layout.STATE_ITEM)
    try:
      with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(state_dir)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises many types for damaged files (ValueError, OSError, tensorstore errors...).
      first_line = str(e).splitlines()[0] if str(e) else ""
      failures.append(f"step {step}: {type(e).__name__}: {first_line}")
      log.warning("%s: checkpoint step %d cannot be read (%s: %s); trying the previous one.",
                  workdir, step, type(e).__name__, first_line)
      continue
    return jax.tree.map(np.asarray, dict(state))
  if failures:
    raise CheckpointRestoreError(f"no checkpoint under {layout.checkpoints_dir(workdir)} can be "
                                 f"read: {'; '.join(failures)}.")
  return None


def restore_trained_params(workdir: str, *, use_ema: bool = True) -> dict[str, Any] | None:
  """The newest readable checkpoint's trained parameters ({'unet': ..., ...}) as numpy, or None.

  EMA weights when the run kept them and `use_ema`, else the raw parameters.
  """
  state = read_newest_state(workdir)
  if state is None:
    return None
  params = state.get("ema_params") if use_ema else None
  if not params:
    params = state["params"]
  return dict(params)


# ------------------------------------------------------------------------------------------------
# First stages alone (evaluating autoencoders).
# ------------------------------------------------------------------------------------------------
def read_first_stage_config(workdir: str) -> ml_collections.ConfigDict:
  """The first_stage.json of a stage-1 workdir."""
  path = layout.first_stage_path(workdir)
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise CheckpointNotFoundError(f"{workdir}: no {layout.FIRST_STAGE_FILE} (not an autoencoder "
                                  f"workdir).") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: not a JSON first-stage config ({e}).") from None


def load_first_stage(path: str) -> tuple[dict, dict[str, Any]]:
  """(first-stage config, variables {'params': ...}) of an autoencoder workdir, a stage-2 workdir
  or a saved model; the newest checkpoint's weights for workdirs (EMA for stage 2)."""
  if layout.is_autoencoder_workdir(path):
    cfg = read_first_stage_config(path).to_dict()
    state = read_newest_state(path)
    if state is None:
      raise CheckpointNotFoundError(f"{path}: no complete checkpoint in "
                                    f"{layout.checkpoints_dir(path)}.")
    return cfg, {"params": state["params"]["autoencoder"]}
  config, params = load_model(path, use_ema=True)
  return config.first_stage.to_dict(), params["first_stage"]


def load_compvis_first_stage(ckpt: str, yaml_path: str) -> tuple[dict, dict[str, Any]]:
  """(first-stage config, variables) of a CompVis first stage (e.g. the zoo's kl-f8 model.ckpt
  with its config.yaml), or of the first stage inside a whole CompVis LDM checkpoint."""
  try:
    with open(yaml_path, encoding="utf-8") as f:
      node = (yaml.safe_load(f) or {}).get("model")
  except FileNotFoundError:
    raise CheckpointNotFoundError(f"{yaml_path}: no such YAML config.") from None
  if node is None:
    raise ConfigError(f"{yaml_path}: no top-level 'model' entry.")
  cfg = compvis_config.first_stage_config(node, "model")
  state_dict = torch_io.load_state_dict(ckpt)
  prefix = "first_stage_model."  # A whole LDM checkpoint holds its first stage under this prefix.
  if any(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  module = build.build_first_stage(cfg)
  return cfg, {"params": ae_convert.autoencoder_from_compvis(state_dict, module)}
