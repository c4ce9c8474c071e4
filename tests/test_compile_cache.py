"""The persistent compilation cache: where it lives, and that a warm sample.py compiles nothing.

The warm-start test runs sample.py twice in fresh processes on one cache directory and counts, with
`jax.monitoring` listeners, the executables asked of XLA (the backend-compile event, which fires
for every one, cached or not) and those that came from the persistent cache: the difference is what
XLA really compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from ldm_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs sample.py's main, then prints how many programs XLA compiled and how many came from the cache.
_RUNNER = """
import json, sys
from jax import monitoring
counts = {"requests": 0, "cache_hits": 0}
def on_duration(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    counts["requests"] += 1
def on_event(event, **kwargs):
  if event == "/jax/compilation_cache/cache_hits":
    counts["cache_hits"] += 1
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
import sample
sample.main(sys.argv[1:])
counts["compiled"] = counts["requests"] - counts["cache_hits"]
print("COUNTS " + json.dumps(counts))
"""


def test_resolve_order(tmp_path):
  env = {"HOME": "/home/u"}
  assert compile_cache.resolve(None, env) == "/home/u/.cache/ldm_jax/jax"
  env["XDG_CACHE_HOME"] = "/xdg"
  assert compile_cache.resolve(None, env) == "/xdg/ldm_jax/jax"
  env[compile_cache.ENV] = str(tmp_path / "env")
  assert compile_cache.resolve(None, env) == str(tmp_path / "env")
  assert compile_cache.resolve(str(tmp_path / "flag"), env) == str(tmp_path / "flag")
  assert compile_cache.resolve("off", env) is None
  env[compile_cache.ENV] = "OFF"
  assert compile_cache.resolve(None, env) is None
  assert compile_cache.resolve(str(tmp_path / "flag"), env) == str(tmp_path / "flag")


def test_unusable_directory_is_a_one_line_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "none"),
                         "--prompt", "x", "--outdir", str(tmp_path / "o"),
                         "--compilation_cache", str(blocker / "cache")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and str(blocker / "cache") in proc.stderr


def _sample(cache, workdir, outdir, *args):
  env = dict(os.environ, **{compile_cache.ENV: str(cache)})
  proc = subprocess.run([sys.executable, "-c", _RUNNER, "--checkpoint", workdir, "--steps", "2",
                         "--num_samples", "2", "--no_progress", "--outdir", str(outdir), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("COUNTS "))
  return json.loads(line[len("COUNTS "):])


def test_warm_run_with_other_prompt_seed_and_guidance_compiles_nothing(tiny_workdirs, tmp_path):
  cache = tmp_path / "cache"
  cold = _sample(cache, tiny_workdirs["ldm"], tmp_path / "a", "--prompt", "a red circle",
                 "--seed", "1", "--guidance", "2.0")
  assert cold["compiled"] > 0 and os.listdir(cache)
  warm = _sample(cache, tiny_workdirs["ldm"], tmp_path / "b", "--prompt",
                 "a blue square at the top left", "--seed", "5", "--guidance", "4.5")
  assert cold["cache_hits"] == 0, cold
  assert warm["compiled"] == 0 and warm["requests"] == cold["requests"], (cold, warm)


def _lora_file(workdir, path):
  """A Kohya-layout file on the first self-attention query of the model's UNet."""
  import numpy as np
  import safetensors.numpy
  from ldm_jax import model_io
  from ldm_jax.convert import common
  from ldm_jax.convert import lora as lora_lib
  config, params = model_io.load_model(workdir)
  targets = lora_lib.targets(config)[lora_lib.UNET]
  name = next(m for m in sorted(targets) if m.endswith("attn1.to_q"))
  width = int(common.flatten(params["unet"]["params"])[targets[name][0]].shape[0])
  stem = "lora_unet_" + name.replace(".", "_")
  rs = np.random.RandomState(0)
  safetensors.numpy.save_file({f"{stem}.lora_down.weight": rs.randn(2, width).astype(np.float32),
                               f"{stem}.lora_up.weight": rs.randn(width, 2).astype(np.float32)},
                              str(path))
  return str(path)


def test_another_lora_scale_compiles_nothing(tiny_workdirs, tmp_path):
  """Merged LoRA weights are arguments of the compiled programs, like the weights themselves."""
  cache = tmp_path / "cache"
  lora = _lora_file(tiny_workdirs["ldm"], tmp_path / "q.safetensors")
  common = ["--prompt", "a red circle", "--guidance", "2.0"]
  cold = _sample(cache, tiny_workdirs["ldm"], tmp_path / "a", *common, "--lora", f"{lora}:0.5")
  assert cold["compiled"] > 0
  warm = _sample(cache, tiny_workdirs["ldm"], tmp_path / "b", *common, "--lora", f"{lora}:1.5")
  assert warm["compiled"] == 0, warm


def test_off_writes_no_cache(tiny_workdirs, tmp_path):
  counts = _sample("off", tiny_workdirs["ldm"], tmp_path / "a", "--prompt", "a red circle")
  assert counts["compiled"] > 0 and counts["cache_hits"] == 0
