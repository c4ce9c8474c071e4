"""Two train.py processes on localhost (2 CPU devices each, gloo collectives) train stage 1, save,
restore and continue; every step's loss equals a one-process run on 4 devices of the same batches.

The processes find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
which `parallel.maybe_initialize_distributed` passes to `jax.distributed.initialize`.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
# The cheapest stage-1 run: 16 px, one autoencoder level, a 1-layer discriminator (on from step 1).
TINY = ["--config=configs/shapes_autoencoder.py:tiny", "--config.data.image_size=16",
        "--config.model.first_stage.kwargs.resolution=16",
        "--config.model.first_stage.kwargs.ch_mult=(1,)", "--config.loss.disc_ndf=8",
        "--config.loss.disc_num_layers=1", "--config.data.batch_size=4", "--config.mesh.data=-1",
        "--config.checkpoint.every=2"]
TIMEOUT = 400


def _env(devices: int, cache, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  # The restarted processes reuse the first launch's compiled step from the cache.
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, steps: int, cache) -> None:
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "train.py", *TINY, f"--workdir={workdir}",
       f"--config.train.num_steps={steps}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=_env(2, cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  try:
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  codes = [p.returncode for p in procs]
  report = "\n".join(f"--- process {i} (exit {c}):\n{out[-3000:]}"
                     for i, (c, out) in enumerate(zip(codes, outs)))
  assert codes == [0, 0], report


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows}


def test_two_processes_match_one_process_and_resume(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  cache = tmp_path / "jax_cache"
  _two_processes(multi, steps=2, cache=cache)
  assert sorted(_losses(multi)) == [1, 2]
  assert (multi / "checkpoints" / "2").is_dir()
  _two_processes(multi, steps=3, cache=cache)  # Restores step 2 on both processes and takes step 3.

  ref = subprocess.run(
      [sys.executable, str(HERE / "multihost_worker.py"), "2", *TINY, f"--workdir={single}",
       "--config.train.num_steps=3"], cwd=REPO, env=_env(4, cache), capture_output=True, text=True,
      timeout=TIMEOUT)
  assert ref.returncode == 0, ref.stderr[-4000:]

  got, want = _losses(multi), _losses(single)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  # Only the step-3 line of the resumed run may follow the first run's lines: nothing re-ran.
  with open(multi / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  steps = sorted(want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)
  assert all(np.isfinite(want[s]) for s in steps)
  with open(multi / "summary.json") as f:
    assert json.load(f)["step"] == 3
