"""ldm_jax's XLA:CPU flag (ldm_jax/xla_cpu.py) against jaxlib's default, in one process.

    .venv/bin/python benchmarks/xla_cpu_ab.py                                # every program
    .venv/bin/python benchmarks/xla_cpu_ab.py --programs train --batch 8 --repeats 8
    .venv/bin/python benchmarks/xla_cpu_ab.py --types LIBRARY_FUSION_TYPE_REDUCE  # other sets

Each program (peer_models.py's UNet forward and train step, the kl-f8 decode; their random
weights) is compiled twice from one lowering: with XLA's defaults, and with the flag passed as a
per-compile option (`Lowered.compile(compiler_options)`), so both run in the same process, timed
round-robin. Separate processes on a shared 2-core machine differ by 10-30% from run to run; this
comparison does not have that noise. The process itself starts with the flag turned off
(LDM_JAX_XLA_CPU_DEFAULTS=0), so "default" really is jaxlib's default.
"""

import argparse
import os
import sys

os.environ["LDM_JAX_XLA_CPU_DEFAULTS"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".venv", "bench-deps"))  # peer_models imports diffusers
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import ldm_jax  # noqa: E402,F401  (reads the opt-out above: XLA_FLAGS stays as it was)
from ldm_jax import xla_cpu  # noqa: E402

PROGRAMS = ("unet", "train", "decode")


def programs(names, batch):
  """{name: (function, args, donated argnums)} built from the benchmark models."""
  import jax.numpy as jnp
  import numpy as np
  import peer_models as pm
  import peers
  out = {}
  if {"unet", "train"} & set(names):
    unet = pm.build_unet()
    inp = pm.unet_inputs(batch)
    x, t, c = (jnp.asarray(inp[k]) for k in ("x", "t", "context"))
    forward = lambda p, x, t, c: unet.ours.apply({"params": p}, x, t, c)
    if "unet" in names:
      out[f"unet b{batch}"] = (forward, (unet.ours_params, x, t, c), ())
    if "train" in names:
      noise = jnp.asarray(np.random.RandomState(9).randn(*x.shape).astype(np.float32))
      tx, step = peers._jax_train_step(forward)  # pylint: disable=protected-access
      out[f"train b{batch}"] = (step, ((unet.ours_params, tx.init(unet.ours_params)), x, t, c,
                                       noise), (0,))
  if "decode" in names:
    vae = pm.build_vae()
    z = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 4), jnp.float32)
    out["decode b2"] = (lambda p, z: vae.ours.apply({"params": p}, z, method=vae.ours.decode),
                        (vae.ours_params, z), ())
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma list from {PROGRAMS}")
  p.add_argument("--batch", type=int, default=8, help="UNet batch (decode runs at batch 2)")
  p.add_argument("--repeats", type=int, default=6, help="timed rounds")
  p.add_argument("--types", default=xla_cpu.YNN_FUSION_TYPES,
                 help="YNNPACK fusion types of the variant (default: what ldm_jax sets)")
  args = p.parse_args(argv)
  names = [n for n in args.programs.split(",") if n]
  if bad := [n for n in names if n not in PROGRAMS]:
    p.error(f"--programs={bad}; expected names from {PROGRAMS}")
  import jax
  import bench_util as bu
  import peers
  flag = {xla_cpu.YNN_FUSION_FLAG.lstrip("-"): args.types}
  for name, (fn, fn_args, donate) in programs(names, args.batch).items():
    lowered = jax.jit(fn, donate_argnums=donate).lower(*fn_args)
    compiled = {"default": lowered.compile(), "flag": lowered.compile(flag)}
    # Donated state is replaced by each call's output, per variant.
    state = {k: peers._copy_tree(fn_args) for k in compiled}  # pylint: disable=protected-access

    def call(k):
      out = compiled[k](*state[k])
      if donate:
        state[k] = (out[0],) + state[k][1:]
      return out
    times, _ = bu.interleaved({k: (lambda k=k: call(k)) for k in compiled}, args.repeats)
    base = bu.median(times["default"])
    for k, v in times.items():
      print(f"{name:10s} {k:8s} median {1e3 * bu.median(v):8.1f} ms  "
            f"({bu.median(v) / base - 1:+.1%})  " + " ".join(f"{1e3 * s:.0f}" for s in v),
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
