"""Timing, cost and memory helpers shared by the peer benchmarks (`benchmarks/peers.py`).

  * `interleaved(fns, repeats)`: times several callables round-robin (A, B, C, A, B, C, ...) so
    that load from other processes hits every peer alike; returns each one's list of seconds.
  * `jax_compiled(fn, *args)`: jit(...).lower(...).compile() with its wall time, XLA's FLOP count
    (`cost_analysis`) and memory figures (`memory_analysis`).
  * `PeakRSS`: a context manager that samples the process RSS every millisecond on a thread; its
    `delta` is the peak increase over the RSS at entry (a measure that treats every peer alike;
    `interleaved` takes it over each peer's first call).
  * `matmul_peak()`: the dense f32 matmul FLOP/s of jnp and torch on this machine, the denominator
    of the MFU column.
  * `write_record(record, name, out, start)`: the run's JSON, by default under benchmarks/results/.
"""

import json
import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import psutil


def block(x: Any) -> Any:
  """Waits for every array in x: jax arrays by block_until_ready; torch / numpy are already done."""
  import jax
  for leaf in jax.tree.leaves(x):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return x


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                ) -> tuple[dict[str, list[float]], dict[str, int]]:
  """Round-robin timing: `warmup` untimed calls of each, then `repeats` rounds of one call each.

  Returns ({name: seconds per timed call}, {name: peak RSS growth in bytes during its first
  call}). The first call is where a peer's allocator takes memory from the OS; later calls reuse
  its pools, so their RSS barely moves.
  """
  rss, times = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    if warmup:
      with PeakRSS() as watch:
        block(fn())
      rss[name] = watch.delta
  for _ in range(max(warmup - 1, 0)):
    for fn in fns.values():
      block(fn())
  for i in range(repeats):
    for name, fn in fns.items():
      watch = PeakRSS() if name not in rss else None
      start = time.perf_counter()
      if watch is not None:
        with watch:
          block(fn())
        rss[name] = watch.delta
      else:
        block(fn())
      times[name].append(time.perf_counter() - start)
  return times, rss


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def unrolled_flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of jit(fn)(*args) with ldm_jax's CPU attention blocking switched off.

  XLA counts a loop body once, so the blocked attention (a lax.map) would be undercounted;
  the same function without blocking has the same arithmetic in straight-line code. Counted on
  the lowering (no compile).
  """
  import jax
  from ldm_jax.kernels import flash_attention as attention
  saved, attention.CPU_ATTENTION_BLOCK = attention.CPU_ATTENTION_BLOCK, None
  try:
    # A fresh wrapper: jit(fn) would reuse the (blocked) trace cached by an earlier jit of fn.
    cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()
  finally:
    attention.CPU_ATTENTION_BLOCK = saved
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def jax_compiled(fn: Callable, *args, donate_argnums=()) -> dict:
  """Compiles jit(fn) for args; returns {'compiled', 'compile_s', 'flops', 'temp_bytes', ...}.

  compile_s covers tracing, lowering and XLA compilation (what a user's first call waits for).
  flops: `unrolled_flops` (a sampling loop's body still counts once: `peers.py` multiplies it out).
  """
  import jax
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  out = dict(compiled=compiled, compile_s=time.perf_counter() - start)
  out["flops"] = unrolled_flops(fn, *args)
  mem = compiled.memory_analysis()
  for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
    out[name.replace("_size_in", "")] = float(getattr(mem, name, float("nan")))
  return out


class PeakRSS:
  """Peak resident-set increase (bytes) during a `with` block, sampled every `interval` s."""

  def __init__(self, interval: float = 1e-3):
    self.interval = interval
    self.delta = 0
    self._proc = psutil.Process(os.getpid())

  def __enter__(self):
    self._start = self._peak = self._proc.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def _watch(self):
    while not self._stop.is_set():
      self._peak = max(self._peak, self._proc.memory_info().rss)
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._peak = max(self._peak, self._proc.memory_info().rss)
    self.delta = self._peak - self._start
    return False


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Best-of-`repeats` f32 [n, n] @ [n, n] FLOP/s for jnp and for torch (2 n^3 FLOPs each)."""
  import jax
  import jax.numpy as jnp
  import torch
  rs = np.random.RandomState(0)
  a, b = rs.randn(n, n).astype(np.float32), rs.randn(n, n).astype(np.float32)
  flops = 2.0 * n ** 3
  mm = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  times, _ = interleaved({"jax": lambda: mm(ja, jb), "torch": lambda: torch.mm(ta, tb)},
                         repeats=repeats, warmup=2)
  return {name: flops / min(ts) for name, ts in times.items()}


def versions() -> dict[str, str]:
  """Library versions and the machine, for the JSON record."""
  import platform
  import diffusers
  import flax
  import jax
  import torch
  return dict(jax=jax.__version__, flax=flax.__version__, torch=torch.__version__,
              diffusers=diffusers.__version__, python=platform.python_version(),
              cpu=platform.processor() or platform.machine(), cores=str(os.cpu_count()),
              torch_threads=str(torch.get_num_threads()),
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def write_record(record: dict, name: str, out: str, start: float) -> str:
  """Adds the run's wall time to `record` and writes it to `out`, by default
  benchmarks/results/<name>-<date>-<time>.json; prints and returns the path."""
  record["wall_s"] = time.time() - start
  out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            time.strftime(f"{name}-%Y%m%d-%H%M%S.json"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=1, default=float)
  print(f"wrote {out} ({record['wall_s']:.0f} s)")
  return out
