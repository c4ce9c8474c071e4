"""Hyper-parameter sweeps: a sweep file -> one workdir and one clean train.py process per run.

A sweep file defines `get_sweep()` returning a list of override dicts ({"train.learning_rate": 1e-4,
...}), built with the helpers below:

  product(**{"loss.base_learning_rate": [1e-4, 3e-4]})        # 2 runs
  product(zip_(**{"data.batch_size": [2, 4], "seed": [0, 1]}),
          **{"train.learning_rate": [1e-4, 3e-4]})              # 2 x 2 = 4 runs
  chain(sweep_a, sweep_b)                                       # runs of a, then of b

`plan` checks every override against the base config (unknown keys, wrong types, configs that
`validate.check_config` refuses) before anything runs; `run_all` writes `config.json` into each run's
workdir, runs `train.py` in a subprocess per run (or only prints the commands), skips runs whose
`summary.json` already reaches `train.num_steps`, and `format_table` summarises them all.
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from ldm_jax import validate
from ldm_jax import workdir_layout as layout
from ldm_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short names for common keys in run names ("lr=0.0001,bs=4"); other keys use their last part.
ABBREVIATIONS = {"learning_rate": "lr", "base_learning_rate": "lr", "batch_size": "bs",
                 "num_steps": "steps", "weight_decay": "wd", "grad_clip_norm": "clip",
                 "ema_decay": "ema", "warmup_steps": "warmup"}
DEFAULT_METRICS = ("loss", "rec_loss", "psnr", "grad_norm")


class SweepError(UserError, ValueError):
  """A bad sweep file or override: names the run, the key and the value."""


# --- Building sweeps. ---

def product(*sweeps: Sequence[Mapping[str, Any]], **axes: Sequence[Any]) -> list[dict]:
  """Cartesian product of sweeps (lists of override dicts) and of keyword axes (key -> values).

  Keys with dots are passed as `**{"train.learning_rate": [...]}`. Later factors vary fastest.
  """
  factors = [list(s) for s in sweeps]
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise SweepError(f"product: values of {key!r} must be a list, got {values!r}")
    factors.append([{key: v} for v in values])
  runs = []
  for combo in itertools.product(*factors):
    run = {}
    for part in combo:
      clash = set(run) & set(part)
      if clash:
        raise SweepError(f"product: key(s) {sorted(clash)} set by two factors")
      run.update(part)
    runs.append(run)
  return runs


def zip_(**axes: Sequence[Any]) -> list[dict]:
  """Runs that vary several keys together: the i-th run takes the i-th value of every key."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zip_: every key needs the same number of values, got {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def chain(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict]:
  """The runs of each sweep, one sweep after the other."""
  return [dict(run) for sweep in sweeps for run in sweep]


def load_sweep(path: str) -> list[dict]:
  """The override dicts of a sweep file's `get_sweep()`."""
  if not os.path.isfile(path):
    raise SweepError(f"--sweep={path}: no such file")
  spec = importlib.util.spec_from_file_location("_ldm_jax_sweep_def", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"--sweep={path}: expected a function get_sweep() returning a list of dicts")
  runs = module.get_sweep()
  if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
    raise SweepError(f"--sweep={path}: get_sweep() returned {runs!r}; expected a non-empty list "
                     "of override dicts")
  return runs


# --- Resolving runs against the base config. ---

@dataclasses.dataclass
class Run:
  name: str
  overrides: dict      # This run's keys (they name it).
  common: dict         # Keys given to every run of the sweep (e.g. from the command line).
  config: ml_collections.ConfigDict
  workdir: str


def run_name(overrides: Mapping[str, Any]) -> str:
  """'lr=0.0001,bs=4': short key names, values as written; full keys where short ones clash."""
  short = {k: ABBREVIATIONS.get(k.split(".")[-1], k.split(".")[-1]) for k in overrides}
  counts = {s: list(short.values()).count(s) for s in short.values()}
  parts = []
  for key, value in overrides.items():
    label = short[key] if counts[short[key]] == 1 else key
    text = format_value(value).replace(" ", "").replace("/", "_")
    parts.append(f"{label}={text}")
  return ",".join(parts) or "base"


def format_value(value: Any) -> str:
  """A value as a `--config.key=value` flag writes it (config_flags parses it back)."""
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "") -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted-key overrides set; unknown keys and bad types raise."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked deep copy, types kept.
  config.lock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise SweepError(f"{where}override {key!r}: the config has no field "
                         f"{'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise SweepError(f"{where}override {key!r}: unknown config key (no field {leaf!r} in "
                       f"{'.'.join(parents) or 'the config'})")
    try:
      node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    except (TypeError, ValueError, KeyError) as e:
      raise SweepError(f"{where}override {key}={value!r}: {e}") from None
  return config


def plan(base: ml_collections.ConfigDict, runs: Sequence[Mapping[str, Any]], workdir: str,
         common: Mapping[str, Any] | None = None) -> list[Run]:
  """Resolves and checks every run before any of them starts.

  `base` must already include `common`, the overrides shared by all runs: they are checked here
  and repeated on each run's command line.
  """
  common = dict(common or {})
  apply_overrides(base, common, "common overrides: ")
  out, names = [], set()
  for i, overrides in enumerate(runs):
    name = run_name(overrides)
    where = f"sweep run {i} ({name}): "
    config = apply_overrides(base, overrides, where)
    # The mesh is checked by train.py on the machine that runs it (this one may have other
    # devices, e.g. when printing commands for a pod), so check the rest with a mesh that fits.
    checked = ml_collections.ConfigDict(config.to_dict())
    checked.mesh.update(data=-1, fsdp=1, tensor=1)
    try:
      validate.check_config(checked)
    except ValueError as e:
      raise SweepError(f"{where}{e}") from None
    if name in names:
      raise SweepError(f"{where}two runs have the same overrides")
    names.add(name)
    out.append(Run(name, dict(overrides), common, config,
                   os.path.join(os.path.abspath(workdir), name)))
  return out


# --- Running and summarising. ---

def command(run: Run, config_arg: str, python: str = sys.executable) -> list[str]:
  """The train.py command line of one run."""
  cmd = [python, os.path.join(REPO_ROOT, "train.py"), f"--config={config_arg}",
         f"--workdir={run.workdir}"]
  flags = dict(run.common, **run.overrides)
  return cmd + [f"--config.{k}={format_value(v)}" for k, v in flags.items()]


def read_summary(run: Run) -> dict | None:
  path = layout.summary_path(run.workdir)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_complete(run: Run) -> bool:
  summary = read_summary(run)
  return summary is not None and summary.get("step", -1) >= run.config.train.num_steps


def write_config(run: Run) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  with open(layout.config_path(run.workdir), "w") as f:
    f.write(run.config.to_json_best_effort(indent=2, sort_keys=True))


def run_all(runs: Sequence[Run], config_arg: str, mode: str = "run", env: Mapping | None = None,
            out=sys.stdout) -> dict[str, str]:
  """Runs (mode='run') or prints (mode='print') every run; returns {run name: status}.

  A run's output goes to `<workdir>/train.log`; a failed run does not stop the others.
  """
  if mode not in ("run", "print"):
    raise SweepError(f"--mode={mode!r}: expected 'run' or 'print'")
  status = {}
  for i, run in enumerate(runs):
    write_config(run)
    cmd = command(run, config_arg)
    if is_complete(run):
      status[run.name] = "done (skipped)"
    elif mode == "print":
      print(shlex.join(cmd), file=out)
      status[run.name] = "not run"
    else:
      print(f"[{i + 1}/{len(runs)}] {run.name}", file=out, flush=True)
      with open(os.path.join(run.workdir, "train.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(env) if env is not None else None)
      status[run.name] = "ok" if rc == 0 and is_complete(run) else (
          f"failed (exit {rc}, see {os.path.join(run.workdir, 'train.log')})")
  return status


def format_table(runs: Sequence[Run], status: Mapping[str, str],
                 metrics: Sequence[str] = DEFAULT_METRICS) -> str:
  """One row per run: name, overrides, final step and metrics from summary.json, status."""
  header = ["run", "overrides", "step", *metrics, "status"]
  rows = []
  for run in runs:
    summary = read_summary(run) or {}
    cells = [run.name, json.dumps(run.overrides, sort_keys=True, separators=(",", ":")),
             _fmt(summary.get("step"), integer=True)]
    cells += [_fmt(summary.get(m)) for m in metrics]
    rows.append(cells + [status.get(run.name, "done" if is_complete(run) else "not run")])
  widths = [max(len(str(r[c])) for r in [header] + rows) for c in range(len(header))]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(value, integer: bool = False) -> str:
  if value is None:
    return "-"
  if integer:
    return str(int(value))
  return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
