"""LoRA training in stage 2: low-rank adapters on a frozen model, and the workdirs that hold them.

With `config.lora.rank` = r > 0 the latent diffusion trainer keeps the model of `config.init_from`
frozen and optimises adapters only. Every targeted kernel W (our layout [*lead, out]) gets a pair
down [*lead, r], drawn as PEFT draws lora_A (kaiming-uniform, bound 1 / sqrt(fan_in)), and up [r, out],
zeros, so that step 0 is exactly the base model; the forward pass uses W + (alpha / r) * down . up.
The Flax modules stay as they are: the loss adds the deltas into the parameter tree before `apply`
(`convert.lora.apply`), and so does the model the sample grid and the eval hook run.

The train state holds the adapters (with their AdamW moments and EMA), laid out by the sharding rules
of every parameter (small ones are replicated); the frozen base is a further argument of the step,
placed on the mesh by the same rules, never a constant of the program nor part of a checkpoint. The
workdir keeps no copy of the base either: `lora.json` records its path, the rank, alpha and targets,
and the model config; a restart loads the base from that path again and refuses another one.

Readers: `read_workdir` turns a workdir's newest adapters into a `convert.lora.LoraFile`, so they merge
(`merge_files`: sample.py --lora WORKDIR) and export (`export`: python -m ldm_jax.convert
--export_lora) like a file.
"""

import json
import logging
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax import model_io
from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.convert import common
from ldm_jax.convert import lora as lora_files
from ldm_jax.errors import ConfigError
from ldm_jax.train import ldm_task
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib

log = logging.getLogger("ldm_jax.train")

# config.lora.targets -> (component, pattern of the module names it adapts, in diffusers' naming for
# the UNet and transformers' for the text encoder: `convert.lora.module_names`).
TARGETS = {
    "attention": (lora_files.UNET, r"\.attn\d+\.to_(q|k|v|out\.0)$"),
    "convs": (lora_files.UNET, r"(\.resnets\.\d+\.conv[12]|\.(down|up)samplers\.0\.conv)$"),
    "text_encoder": (lora_files.TEXT, r"\.self_attn\.(q|k|v|out)_proj$"),
}
ADAPTERS = "lora"  # The train state's params: {ADAPTERS: adapter tree, 'logvar': ... if learned}.


def enabled(config) -> bool:
  """Whether `config` trains LoRA adapters (config.lora.rank > 0)."""
  section = config.get("lora")
  return section is not None and bool(section.get("rank"))


def trains_text_encoder(config) -> bool:
  """Whether the frozen text encoder carries adapters, so it must run inside the train step."""
  return enabled(config) and "text_encoder" in tuple(config.lora.targets)


def check_config(config) -> None:
  """Raises ConfigError naming the first field of config.lora that cannot be trained."""
  section = config.lora
  rank, alpha, targets = section.rank, section.alpha, section.targets
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ConfigError(f"config.lora.rank={rank!r}: expected an integer >= 0 (0 = no LoRA).")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
      or alpha < 0:
    raise ConfigError(f"config.lora.alpha={alpha!r}: expected a finite number >= 0 "
                      f"(0 = the rank).")
  if isinstance(targets, str) or not targets or any(t not in TARGETS for t in targets):
    raise ConfigError(f"config.lora.targets={targets!r}: expected a non-empty tuple of "
                      f"{tuple(TARGETS)}.")
  if config.stage != "ldm":
    raise ConfigError(f"config.lora.rank={rank} with config.stage={config.stage!r}: LoRA adapters "
                      f"train stage 2 ('ldm') only.")


def scaling(rank: int, alpha: float) -> float:
  """alpha / rank, alpha 0 meaning the rank."""
  return float(alpha or rank) / rank


# ------------------------------------------------------------------------------------------------
# The workdir's record of the frozen base.
# ------------------------------------------------------------------------------------------------
def read_record(workdir: str) -> dict[str, Any] | None:
  """The workdir's lora.json, or None when it has none."""
  path = layout.lora_path(workdir)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: not the JSON record a LoRA run writes ({e}).") from None
  fields = ("base", "rank", "alpha", "targets", "model")
  missing = [k for k in fields if k not in record] if isinstance(record, dict) else None
  if missing is None or missing:
    found = f"{', '.join(missing)} missing" if missing else f"a JSON {type(record).__name__}"
    raise ConfigError(f"{path}: {found}; expected the object a LoRA run writes, with "
                      f"{', '.join(fields)}.")
  return record


def load_base(config, workdir: str) -> ldm_lib.LatentDiffusion:
  """The frozen model: config.init_from, or the base the workdir's record names (they must agree),
  with the record written on a fresh start."""
  check_config(config)
  if os.path.isdir(layout.model_dir(workdir)):
    raise ConfigError(f"{workdir} holds the model/ of a full training run; config.lora.rank="
                      f"{config.lora.rank} needs a workdir of its own.")
  record = read_record(workdir)
  base = os.path.abspath(config.init_from) if config.init_from else ""
  if record is not None:
    if base and base != record["base"]:
      raise ConfigError(f"config.init_from={config.init_from}: the adapters in {workdir} were "
                        f"trained on {record['base']}; give that model (or no init_from).")
    for field in ("rank", "alpha", "targets"):
      value = config.lora[field]
      if (list(value) if field == "targets" else value) != record[field]:
        raise ConfigError(f"config.lora.{field}={value!r}: the adapters in {workdir} have "
                          f"{field} {record[field]!r}; resume with that value or use a new workdir.")
    base = record["base"]
  if not base:
    raise ConfigError(f"config.lora.rank={config.lora.rank} trains adapters on a frozen model: set "
                      f"config.init_from to a saved or converted model, or a training workdir.")
  model = ldm_lib.LatentDiffusion.from_checkpoint(base, compute_dtype=config.train.compute_dtype)
  if record is None and parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    record = {"base": base, "rank": config.lora.rank, "alpha": config.lora.alpha,
              "targets": list(config.lora.targets),
              "model": json.loads(model.config.to_json_best_effort())}
    model_io.write_text_atomic(layout.lora_path(workdir), json.dumps(record, indent=2))
  return model


# ------------------------------------------------------------------------------------------------
# Adapters: which kernels, their initial values, the adapted parameters.
# ------------------------------------------------------------------------------------------------
def selected_kernels(model_config: Mapping[str, Any], targets) -> dict[str, list[tuple]]:
  """component -> the kernel paths config.lora.targets adapts in the model `model_config` builds."""
  names = lora_files.module_names(model_config)
  out: dict[str, set] = {}
  for target in targets:
    component, pattern = TARGETS[target]
    hits = {path for path, (name, _) in names[component].items() if re.search(pattern, name)}
    if not hits:
      what = ("a CLIP text encoder" if component == lora_files.TEXT else
              "modules named like diffusers' " + pattern)
      raise ConfigError(f"config.lora.targets: {target!r} adapts nothing in this model; it "
                        f"needs {what}.")
    out.setdefault(component, set()).update(hits)
  return {component: sorted(paths) for component, paths in sorted(out.items())}


def init_adapters(shapes: Mapping[str, Mapping[tuple, tuple]], rank: int, rng: jax.Array
                  ) -> dict[str, Any]:
  """The adapter tree for kernels of `shapes` ({component: {path: kernel shape}}): down uniform in
  +-1/sqrt(fan_in) (PEFT's kaiming_uniform(a=sqrt(5)) on lora_A), up zeros. float32."""
  tree: dict[str, Any] = {}
  index = 0
  for component, kernels in sorted(shapes.items()):
    flat = {}
    for path, shape in sorted(kernels.items()):
      lead, out = tuple(shape[:-1]), shape[-1]
      bound = 1.0 / math.sqrt(math.prod(lead))
      key = jax.random.fold_in(rng, index)
      index += 1
      flat[path + (lora_files.DOWN,)] = jax.random.uniform(key, lead + (rank,), jnp.float32,
                                                           -bound, bound)  # [*lead, r]
      flat[path + (lora_files.UP,)] = jnp.zeros((rank, out), jnp.float32)  # [r, out]
    tree[component] = common.unflatten(flat)
  return tree


def adapted(params: Mapping[str, Any], adapters: Mapping[str, Any], scale: float
            ) -> dict[str, Any]:
  """params ({'unet': {'params': ...}, ...}) with scale * down . up added to each adapted kernel."""
  return lora_files.apply(params, [lora_files.adapter_deltas(adapters)], [scale])


class LoraTraining:
  """The LoRA parts of a stage-2 run: the adapters' state, the step over them, the adapted model."""

  def __init__(self, model: ldm_lib.LatentDiffusion, config, mesh: jax.sharding.Mesh):
    self.model, self.config = model, config
    self.scale = scaling(config.lora.rank, config.lora.alpha)
    selected = selected_kernels(model.config, config.lora.targets)
    self.shapes = {}
    for component, paths in selected.items():
      flat = common.flatten(model.params[component]["params"])
      self.shapes[component] = {path: tuple(np.shape(flat[path])) for path in paths}
    # The loss runs the UNet always, the text encoder only when it carries adapters.
    frozen = {name: model.params[name] for name in ("unet", "cond_stage")
              if name == "unet" or name in selected}
    self.frozen_shardings = parallel.infer_param_shardings(frozen, mesh,
                                                           config.mesh.min_shard_size)
    self.frozen = jax.device_put(frozen, self.frozen_shardings)
    count = sum(math.prod(s[:-1]) * config.lora.rank + config.lora.rank * s[-1]
                for kernels in self.shapes.values() for s in kernels.values())
    log.info("LoRA: rank %d, scale %.4g, %d adapted kernels, %d trainable parameters.",
             config.lora.rank, self.scale, sum(map(len, self.shapes.values())), count)

  def init_state(self, optimizer):
    """(init_fn, args) of the fresh TrainState over the adapters (and a learned logvar)."""
    config = self.config
    extra = {}
    if config.train.learn_logvar:
      extra["logvar"] = ldm_task.trainable_params(self.model, config)["logvar"]

    def init(rng_adapters, rng_state, extra):
      trainable = dict(extra, **{ADAPTERS: init_adapters(self.shapes, config.lora.rank,
                                                        rng_adapters)})
      return state_lib.create_train_state(trainable, optimizer, rng_state,
                                          use_ema=config.train.use_ema)
    return init, (jax.random.PRNGKey(config.seed + 3), jax.random.PRNGKey(config.seed + 1), extra)

  def loss_fn(self):
    """loss_fn(trainable, batch, rng, frozen): the diffusion loss of the adapted model."""
    inner = ldm_task.make_loss_fn(self.model, self.config)
    scale = self.scale

    def loss_fn(trainable, batch, rng, frozen):
      params = adapted(frozen, trainable[ADAPTERS], scale)
      params.update({k: v for k, v in trainable.items() if k != ADAPTERS})
      return inner(params, batch, rng)
    return loss_fn

  def make_step(self, mesh, state_shardings, optimizer, lr_fn):
    """(jitted step, (frozen base,)): the generic step over the adapters, the base an argument."""
    step = step_lib.make_config_step(self.loss_fn(), self.config, optimizer, lr_fn, mesh,
                                     state_shardings, frozen_shardings=(self.frozen_shardings,))
    return step, (self.frozen,)

  def adapted_params(self, trained: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen components with the trained adapters added, for `ldm_task.apply_trained`."""
    return adapted(self.frozen, trained[ADAPTERS], self.scale)


# ------------------------------------------------------------------------------------------------
# Reading a LoRA workdir: sampling with it, exporting it.
# ------------------------------------------------------------------------------------------------
def read_workdir(workdir: str, model_config: Mapping[str, Any], *, use_ema: bool = True
                 ) -> lora_files.LoraFile:
  """The newest checkpoint's adapters of a LoRA workdir (EMA ones when kept and `use_ema`), as the
  LoraFile of the model `model_config` describes. LoraError when `workdir` is no LoRA workdir or
  has no finished checkpoint."""
  record = read_record(workdir)
  if record is None:
    raise lora_files.LoraError(
        f"{workdir}: a directory without {layout.LORA_FILE}; expected a LoRA .safetensors file or "
        f"the workdir of a train.py run with config.lora.rank > 0.")
  trained = model_io.restore_trained_params(workdir, use_ema=use_ema)
  if not trained or ADAPTERS not in trained:
    raise lora_files.LoraError(f"{workdir}: no finished checkpoint of LoRA adapters yet.")
  return lora_files.from_adapters(model_config, trained[ADAPTERS],
                                  scaling(record["rank"], record["alpha"]), workdir)


def read(path: str, model_config: Mapping[str, Any]) -> lora_files.LoraFile:
  """A LoRA file (`convert.lora.read`) or a LoRA training workdir (`read_workdir`)."""
  if os.path.isdir(path):
    return read_workdir(path, model_config)
  return lora_files.read(path, model_config)


def merge_files(model_config: Mapping[str, Any], params: Mapping[str, Any], specs) -> dict:
  """`convert.lora.merge_files` for 'PATH[:SCALE]' values naming files or LoRA workdirs."""
  return lora_files.merge_files(model_config, params, specs, reader=read)


def export(workdir: str, out: str, layout_name: str = "peft", *, use_ema: bool = True
           ) -> lora_files.LoraFile:
  """Writes a LoRA workdir's newest adapters to the .safetensors file `out` ('peft' or 'kohya'
  layout, see `convert.lora.file_tensors`), named after the base model the record holds."""
  record = read_record(workdir)
  if record is None:
    raise ConfigError(f"{workdir}: no {layout.LORA_FILE}; expected the workdir of a train.py run "
                      f"with config.lora.rank > 0.")
  lora = read_workdir(workdir, record["model"], use_ema=use_ema)
  lora_files.write(out, lora, layout_name)
  return lora
