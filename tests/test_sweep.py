"""Sweeps: the product/zip_/chain helpers, run names and override checks, the example sweep's
commands (--mode print), and a 4-run sweep of the tiny shapes autoencoder run end to end through
sweep.py (one train.py subprocess per run)."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from configs import shapes_autoencoder
from ldm_jax import sweep

REPO = pathlib.Path(__file__).resolve().parent.parent
# Applied to every run: 2 steps of a 16 px, one-level autoencoder with a 1-layer discriminator.
COMMON = ["--config.data.image_size=16", "--config.model.first_stage.kwargs.resolution=16",
          "--config.model.first_stage.kwargs.ch_mult=(1,)", "--config.loss.disc_ndf=8",
          "--config.loss.disc_num_layers=1", "--config.train.num_steps=2"]


def test_product_zip_chain():
  runs = sweep.product(sweep.zip_(**{"data.batch_size": [2, 4], "seed": [0, 1]}),
                       **{"train.learning_rate": [1e-4, 3e-4]})
  assert runs == [
      {"data.batch_size": 2, "seed": 0, "train.learning_rate": 1e-4},
      {"data.batch_size": 2, "seed": 0, "train.learning_rate": 3e-4},
      {"data.batch_size": 4, "seed": 1, "train.learning_rate": 1e-4},
      {"data.batch_size": 4, "seed": 1, "train.learning_rate": 3e-4}]
  assert sweep.chain(runs[:1], sweep.product(seed=[5])) == [runs[0], {"seed": 5}]
  with pytest.raises(sweep.SweepError, match="same number of values"):
    sweep.zip_(a=[1, 2], b=[1])
  with pytest.raises(sweep.SweepError, match=r"\['seed'\] set by two factors"):
    sweep.product(sweep.product(seed=[0]), seed=[1])


def test_run_names_and_flag_values():
  assert sweep.run_name({"train.learning_rate": 1e-4, "data.batch_size": 4}) == "lr=0.0001,bs=4"
  # Two keys with the same short name keep their full keys.
  assert sweep.run_name({"train.learning_rate": 1, "loss.base_learning_rate": 2}) == (
      "train.learning_rate=1,loss.base_learning_rate=2")
  assert sweep.format_value((1, 2)) == "(1,2)" and sweep.format_value((1,)) == "(1,)"


def test_overrides_are_checked_before_running(tmp_path):
  base = shapes_autoencoder.get_config("tiny")
  runs = sweep.plan(base, [{"train.learning_rate": 3e-4, "model.first_stage.kwargs.ch_mult":
                            [1, 2]}], str(tmp_path))
  assert runs[0].config.train.learning_rate == 3e-4
  assert runs[0].config.model.first_stage.kwargs.ch_mult == (1, 2)
  assert base.train.learning_rate != 3e-4  # The base config is not modified.
  with pytest.raises(sweep.SweepError, match="'train.learnig_rate': unknown config key"):
    sweep.plan(base, [{"seed": 1}, {"train.learnig_rate": 1.0}], str(tmp_path))
  with pytest.raises(sweep.SweepError, match="'trian.learning_rate'.*no field 'trian'"):
    sweep.plan(base, [{"trian.learning_rate": 1.0}], str(tmp_path))
  with pytest.raises(sweep.SweepError, match="data.batch_size='four'"):
    sweep.plan(base, [{"data.batch_size": "four"}], str(tmp_path))
  with pytest.raises(sweep.SweepError, match="config.model.first_stage.kwargs.ch=8"):
    sweep.plan(base, [{"model.first_stage.kwargs.ch": 8}], str(tmp_path))  # validate.py refuses.
  assert not list(tmp_path.iterdir())  # Nothing was written.


def _sweep_py(tmp_path, *args, sweep_file="configs/sweeps/shapes_tiny.py"):
  """sweep.py with workdir tmp_path/sw."""
  # One device; runs whose step is the same program share it through the compilation cache.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run(
      [sys.executable, "sweep.py", "--config=configs/shapes_autoencoder.py:tiny",
       f"--sweep={sweep_file}", f"--workdir={tmp_path / 'sw'}", *COMMON, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _table_rows(stdout) -> list[dict]:
  """The summary table's rows as {column: cell}, cut at the header's column starts."""
  lines = stdout.splitlines()
  i = next(i for i, l in enumerate(lines) if l.startswith("run "))
  cols = [(m.group(), m.start()) for m in re.finditer(r"\S+", lines[i])]
  bounds = [start for _, start in cols[1:]] + [None]
  return [{name: line[start:end].strip() for (name, start), end in zip(cols, bounds)}
          for line in lines[i + 2:]]


def test_unknown_key_fails_before_anything_runs(tmp_path):
  bad = tmp_path / "bad_sweep.py"
  bad.write_text("from ldm_jax.sweep import product\n"
                 "def get_sweep():\n"
                 "  return product(seed=[0, 1]) + product(**{'loss.kl_weigth': [1e-6]})\n")
  out = _sweep_py(tmp_path, sweep_file=str(bad))
  assert out.returncode == 2, out.stderr
  assert "'loss.kl_weigth': unknown config key" in out.stderr
  assert not (tmp_path / "sw").exists()


def test_print_mode_prints_four_commands(tmp_path):
  out = _sweep_py(tmp_path, "--mode=print")
  assert out.returncode == 0, out.stderr
  commands = [l for l in out.stdout.splitlines() if "train.py" in l]
  assert len(commands) == 4
  assert all("--config.train.num_steps=2" in c and "--config.loss.base_learning_rate=" in c
             for c in commands)
  rows = _table_rows(out.stdout)
  assert len(rows) == 4 and all(r["status"] == "not run" and r["loss"] == "-" for r in rows)
  sw = tmp_path / "sw"
  assert sorted(p.name for p in sw.iterdir() if p.is_dir()) == sorted(
      ["bs=2,seed=0,lr=6.25e-05", "bs=2,seed=0,lr=0.000125", "bs=4,seed=1,lr=6.25e-05",
       "bs=4,seed=1,lr=0.000125"])
  cfg = json.loads((sw / "bs=4,seed=1,lr=0.000125" / "config.json").read_text())
  assert (cfg["data"]["batch_size"], cfg["seed"], cfg["loss"]["base_learning_rate"]) == (
      4, 1, 1.25e-4)
  assert cfg["train"]["num_steps"] == 2 and cfg["data"]["image_size"] == 16


def test_four_run_sweep_end_to_end_and_rerun_skips(tmp_path):
  # Seeds x object counts: 4 runs of one step program (the later 3 reuse its compilation).
  sweep_file = tmp_path / "seeds.py"
  sweep_file.write_text("from ldm_jax.sweep import product\n"
                        "def get_sweep():\n"
                        "  return product(seed=[0, 1], **{'data.num_objects': [1, 2]})\n")
  out = _sweep_py(tmp_path, sweep_file=str(sweep_file))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = _table_rows(out.stdout)
  assert [r["run"] for r in rows] == ["seed=0,num_objects=1", "seed=0,num_objects=2",
                                      "seed=1,num_objects=1", "seed=1,num_objects=2"]
  sw = tmp_path / "sw"
  for row in rows:
    assert row["status"] == "ok" and row["step"] == "2", row
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["psnr"]))
    summary = json.loads((sw / row["run"] / "summary.json").read_text())
    assert float(row["loss"]) == pytest.approx(summary["loss"], rel=1e-5)
    overrides = json.loads(row["overrides"])
    cfg = json.loads((sw / row["run"] / "config.json").read_text())
    assert overrides == {"seed": cfg["seed"], "data.num_objects": cfg["data"]["num_objects"]}
    assert cfg["train"]["num_steps"] == 2 and cfg["data"]["image_size"] == 16
  assert len({r["loss"] for r in rows}) == 4  # Different seeds / data: different runs.
  assert (sw / "sweep_summary.txt").read_text().strip() == out.stdout[
      out.stdout.index("run "):].strip()

  again = _sweep_py(tmp_path, sweep_file=str(sweep_file))  # Finished runs: skipped, summarised.
  assert again.returncode == 0, again.stderr[-3000:]
  rows_again = _table_rows(again.stdout)
  assert [r["status"] for r in rows_again] == ["done (skipped)"] * 4
  assert [r["loss"] for r in rows_again] == [r["loss"] for r in rows]
