"""What the XLA:CPU workaround in the one-block attention gradient costs.

    .venv/bin/python benchmarks/attention_row_term.py [--repeats 30]    # about a minute

The softmax gradient needs, per query, sum_k w * dw = dout . out. `kernels/flash_attention.py`
takes the cheap [queries, d] form `dout . out` in its blocked gradients, but in the one-block
gradient (an attention small enough for one block, and every attention on platforms other than
CPU, TPU and GPU) it sums the [queries, keys] product `w * dw` instead: there `out` can be the
forward's own dot in the same XLA computation, and XLA:CPU (jaxlib 0.10.2) miscompiles the fused
`dout . out` (see `_block_backward`). This times the one-block gradient both ways on the shapes
that take that path on CPU (at most CPU_ATTENTION_GRAD_BLOCK logits), each compiled alone with
`out` an input, where both forms are correct: interleaved rounds, median per form.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax.kernels import flash_attention as fa  # noqa: E402

# (pairs = batch x heads, queries, keys, head width): UNet self- and cross-attention at the
# largest sizes that still fit one gradient block (2^19 logits).
SHAPES = ((64, 64, 64, 32), (16, 256, 77, 40), (32, 128, 128, 64), (8, 256, 256, 40),
          (2, 512, 512, 80))


def time_forms(shape, repeats):
  pairs, lq, lk, d = shape
  assert pairs * lq * lk <= fa.CPU_ATTENTION_GRAD_BLOCK, shape
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(pairs, n, d), jnp.float32) for n in (lq, lk, lk))
  scale = d ** -0.5
  out, lse = fa._block_forward(scale, q, k, v, None)  # pylint: disable=protected-access
  dout = jnp.asarray(rs.randn(pairs, lq, d), jnp.float32)
  forms = {
      "row from w * dw [q, k] (one-block form)": jax.jit(
          lambda q, k, v, o, l, g: fa._block_backward(scale, q, k, v, None, None, l, g)),
      "row from dout . out [q, d] (blocked form)": jax.jit(
          lambda q, k, v, o, l, g: fa._block_backward(scale, q, k, v, None, o, l, g)),
  }
  args = (q, k, v, out, lse, dout)
  results = {name: [] for name in forms}
  reference = None
  for name, fn in forms.items():  # Compile, warm up, and check both forms agree.
    grads = jax.block_until_ready(fn(*args))
    if reference is None:
      reference = grads
    else:
      for a, b in zip(grads, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  for _ in range(repeats):
    for name, fn in forms.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      results[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in results.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  report = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load "
                       f"{os.getloadavg()[0]:.1f} at start",
            "jax": jax.__version__, "command": "python benchmarks/attention_row_term.py "
                                               + " ".join(argv or sys.argv[1:]), "rows": []}
  print(f"{'pairs x Lq x Lk x d':>22} | {'one-block form ms':>17} | {'blocked form ms':>15} | extra")
  for shape in SHAPES:
    medians = time_forms(shape, args.repeats)
    workaround, cheap = medians.values()
    report["rows"].append({"shape": shape, "seconds": medians,
                           "extra_fraction": workaround / cheap - 1})
    print(f"{' x '.join(map(str, shape)):>22} | {workaround * 1e3:17.3f} | {cheap * 1e3:15.3f} | "
          f"{100 * (workaround / cheap - 1):+.0f}%", flush=True)
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"attention_row_term-{time.strftime('%Y%m%d-%H%M')}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=2)
  print("wrote", out)


if __name__ == "__main__":
  main()
