"""Where ldm_jax's time goes on CPU: per-op totals of one jitted program from a jax.profiler trace.

    .venv/bin/python benchmarks/profile_ops.py --program unet --batch 2          # UNet forward
    .venv/bin/python benchmarks/profile_ops.py --program unet_grad --batch 8     # its gradient
    .venv/bin/python benchmarks/profile_ops.py --program decode                  # kl-f8 decode
    .venv/bin/python benchmarks/profile_ops.py --program flax_unet --batch 2     # diffusers-Flax's

The program is the peers benchmark's (benchmarks/peer_models.py, random weights). XLA:CPU is
asked to emit a trace event per executed thunk (--xla_cpu_enable_xprof_traceme); the events of a few calls are
summed per HLO instruction, per kind (a fusion is named by the notable ops inside it: convolution,
dot, reduce, exponential, transpose, ...) and per model module (from the instructions' op_name
metadata; instructions without it are listed as "(no metadata)"). Times are thread times
summed over XLA's threads: they add up to more than the wall time when ops run side by side, and
work YNNPACK hands to its own worker threads is not counted. The findings quoted in
benchmarks/README.md (2026-11-22, "What is left") come from this script.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".venv", "bench-deps"))  # peer_models imports diffusers
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import ldm_jax  # noqa: E402,F401  (sets its XLA:CPU flags before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

NOTABLE = ("convolution", "dot", "reduce", "exponential", "transpose", "reduce-window", "pad",
           "concatenate", "dynamic-slice", "dynamic-update-slice", "rsqrt", "divide", "erf",
           "broadcast")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")


def build(program: str, batch: int):
  """(compiled executable, its arguments) for the named program."""
  import peer_models as pm
  if program == "decode":
    vae = pm.build_vae()
    params = jax.device_put(vae.ours_params)
    z = jnp.asarray(np.random.RandomState(0).randn(batch, 32, 32, 4), jnp.float32)
    fn = lambda p, z: vae.ours.apply({"params": p}, z, method=vae.ours.decode)
    args = (params, z)
  else:
    unet = pm.build_unet()
    inp = pm.unet_inputs(batch)
    args = (jax.device_put(unet.ours_params), jnp.asarray(inp["x"]), jnp.asarray(inp["t"]),
            jnp.asarray(inp["context"]))
    forward = lambda p, x, t, c: unet.ours.apply({"params": p}, x, t, c)
    fn = forward if program == "unet" else jax.grad(
        lambda p, x, t, c: jnp.mean(forward(p, x, t, c) ** 2))
    if program == "flax_unet":  # the same UNet and weights in diffusers-Flax, for comparison
      args = (jax.device_put(unet.flax_params), jnp.asarray(pm.nchw(inp["x"])), *args[2:])
      fn = lambda p, x, t, c: unet.flax.apply({"params": p}, x, t, c).sample
  return jax.jit(fn).lower(*args).compile(), args


def describe_instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
  """HLO instruction name -> (kind, result shape, op_name metadata)."""
  bodies = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  out = {}
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op = m.groups()
    meta = re.search(r'op_name="([^"]*)"', line)
    if op == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", line)
      ops = set(re.findall(r"= \S+ ([\w\-]+)\(", bodies.get(called.group(1), "") if called else ""))
      op = "fusion[" + ",".join(sorted(ops & set(NOTABLE))) + "]"
      if "__ynn_fusion" in line:
        op = "ynn:" + op
    out[name] = (op, shape, meta.group(1) if meta else "")
  return out


def module_path(op_name: str) -> str:
  """The last three model scopes of an op_name, layer indices dropped ('(no metadata)' if none)."""
  skip = ("jit(", "jvp(", "transpose(", "closed_call", "checkpoint", "while", "body", "remat")
  parts = [p for p in op_name.split("/") if p and not p.startswith(skip)]
  return "/".join(re.sub(r"_\d+$", "", p) for p in parts[-3:]) or "(no metadata)"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--program", choices=("unet", "unet_grad", "flax_unet", "decode"), default="unet")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--calls", type=int, default=3, help="traced calls (after 2 warm-up calls)")
  p.add_argument("--top", type=int, default=25, help="rows per table")
  args = p.parse_args(argv)

  compiled, call_args = build(args.program, args.batch)
  info = describe_instructions(compiled.as_text())
  for _ in range(2):
    jax.block_until_ready(compiled(*call_args))
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.calls):
        jax.block_until_ready(compiled(*call_args))
    wall_ms = (time.perf_counter() - start) * 1e3 / args.calls
    from jax._src.lib import _profile_data  # the reader behind jax.profiler's ProfileData
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    profile = _profile_data.ProfileData.from_file(path)

  per_instruction = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if "XLA" not in line.name:  # XLA's executor / Eigen threads only, not Python's
        continue
      for event in line.events:
        kind = info.get(event.name, ("",))[0]
        if event.name in info and kind not in ("while", "call", "conditional"):  # no double count
          per_instruction[event.name] += event.duration_ns / 1e6 / args.calls
  per_kind, per_module = collections.Counter(), collections.Counter()
  for name, ms in per_instruction.items():
    kind, _, meta = info[name]
    per_kind[kind] += ms
    per_module[module_path(meta)] += ms

  print(f"{args.program} batch {args.batch}: {wall_ms:.1f} ms per traced call (wall), "
        f"{sum(per_instruction.values()):.1f} ms thread time in XLA ops")
  for title, table in (("per kind", per_kind), ("per module", per_module)):
    print(f"\n-- {title}")
    for key, ms in table.most_common(args.top):
      print(f"{ms:9.2f} ms  {key}")
  print("\n-- per instruction")
  for name, ms in per_instruction.most_common(args.top):
    kind, shape, meta = info[name]
    print(f"{ms:9.2f} ms  {name:32s} {kind:40s} {shape:28s} {module_path(meta)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
