"""Cold and warm start-up of the command lines with JAX's persistent compilation cache.

  python benchmarks/startup.py            # CPU; writes benchmarks/results/startup-<date>.json

Each command runs twice in a fresh process on one new, empty cache directory: the first run
compiles and fills the cache (cold), the second, with another prompt and seed, reads it (warm). The
commands are the tiny configs' `train.py` starts (2 steps, the shapes autoencoder, then the text LDM
on it) and the quickstart's `sample.py` command on that LDM. A third run with `--compilation_cache
off` shows the start without the cache. Times are whole-process wall times (imports, model load,
tracing, compiling, running, writing).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import bench_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(cmd: list[str], env: dict) -> float:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return time.perf_counter() - start


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", help="JSON path (default: benchmarks/results/startup-<date>.json)")
  args = p.parse_args()
  start = time.time()
  tmp = tempfile.mkdtemp(prefix="ldm_jax_startup_")
  env = dict(os.environ, LDM_JAX_COMPILATION_CACHE=os.path.join(tmp, "cache"))
  env.setdefault("JAX_PLATFORMS", "cpu")
  steps = "--config.train.num_steps=2"

  def train_ae(name):
    return ["train.py", "--config", "configs/shapes_autoencoder.py:tiny", "--workdir",
            os.path.join(tmp, name), steps]

  def train_ldm(name):
    return ["train.py", "--config", "configs/shapes_ldm_text.py:tiny", "--workdir",
            os.path.join(tmp, name), steps, f"--config.first_stage_checkpoint={tmp}/ae_cold"]

  def sample(name, seed):
    return ["sample.py", "--checkpoint", os.path.join(tmp, "ldm_cold"), "--prompt_file",
            "configs/shapes_prompts.txt", "--batch_size", "16", "--seed", str(seed),
            "--no_progress", "--outdir", os.path.join(tmp, name)]

  rows = {}
  for what, make in (("train.py shapes_autoencoder:tiny", train_ae),
                     ("train.py shapes_ldm_text:tiny", train_ldm)):
    rows[what] = {"cold": _timed(make(f"{make.__name__[6:]}_cold"), env),
                  "warm": _timed(make(f"{make.__name__[6:]}_warm"), env),
                  "no cache": _timed(make(f"{make.__name__[6:]}_off") +
                                     ["--compilation_cache=off"], env)}
  rows["sample.py quickstart command, tiny LDM"] = {
      "cold": _timed(sample("s_cold", 0), env), "warm": _timed(sample("s_warm", 100), env),
      "no cache": _timed(sample("s_off", 200) + ["--compilation_cache", "off"], env)}
  for what, t in rows.items():
    print(f"{what:40s} cold {t['cold']:6.1f} s   warm {t['warm']:6.1f} s   "
          f"no cache {t['no cache']:6.1f} s")
  bench_util.write_record({"rows": rows, "machine": os.uname().nodename,
                           "cpus": os.cpu_count()}, "startup", args.out, start)


if __name__ == "__main__":
  main()
