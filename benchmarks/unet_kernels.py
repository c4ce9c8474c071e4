"""Kernel by kernel: the benchmarked UNet's convolutions, attentions and matmuls, ldm_jax vs torch.

    .venv/bin/python benchmarks/unet_kernels.py --batch 8        # about 3 min on 2 idle cores

Where does the train step's distance to torch (`peers.py`, row `train`) come from? This script
records every convolution, attention and dense matmul that ldm_jax's UNet runs (from a trace of
its forward pass, with how often each shape occurs) and times each shape alone in both
frameworks: forward, and forward + backward (all input and weight gradients) with the same random
inputs and cotangent, round-robin, median of --repeats. `x n` totals (time x occurrences) per
kind show how much of the whole-step difference each kind explains; what the three kinds leave
out (normalisations, activations, reshapes and the optimizer) is the rest.

ldm_jax side, each under jax.jit: `lax.conv_general_dilated` with the recorded window, strides
and padding (NHWC, as the UNet runs it, including the phased upsampling convolution);
`kernels.attention` (its CPU blocking included); `x @ kernel` for the dense layers. torch side:
`F.conv2d` in NCHW (as diffusers runs it), `F.scaled_dot_product_attention` (its fused CPU
flash-attention kernels), `x @ w`. Results go to benchmarks/results/kernels-<time>.json.
"""

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # no diffusers-Flax here: the venv's diffusers has the torch UNet
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import ldm_jax  # noqa: E402,F401  (sets its XLA:CPU flags before JAX starts)
import numpy as np  # noqa: E402

KINDS = ("conv", "attention", "dense")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8, help="UNet batch the shapes are recorded at")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds per shape")
  p.add_argument("--kinds", default=",".join(KINDS), help=f"comma list from {KINDS}")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  p.add_argument("--out", default="", help="JSON path (default benchmarks/results/kernels-*.json)")
  args = p.parse_args(argv)
  args.kinds = [k for k in args.kinds.split(",") if k]
  bad = [k for k in args.kinds if k not in KINDS]
  if bad:
    p.error(f"--kinds={bad}; expected names from {KINDS}")
  return args


# -------------------------------------------------------------------------------------------------
# Shapes: what the UNet's forward pass runs
# -------------------------------------------------------------------------------------------------
def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(getattr(v, "jaxpr", None), "eqns"):
        yield v.jaxpr


def _walk(jaxpr, found):
  """Counts conv_general_dilated and 2-D-kernel dot_general equations, nested ones included."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
    if name == "conv_general_dilated":
      p = eqn.params
      key = ("conv", shapes[0], shapes[1], tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
             p["dimension_numbers"])
      found[key] += 1
    elif name == "dot_general":
      (contract, batch) = eqn.params["dimension_numbers"]
      # A dense layer: [..., K] x [K, N], no batch dimensions.
      if (len(shapes[1]) == 2 and not batch[0] and contract == ((len(shapes[0]) - 1,), (0,))):
        found[("dense", shapes[0], shapes[1])] += 1
    for sub in _sub_jaxprs(eqn.params):
      _walk(sub, found)


def record_shapes(batch: int) -> collections.Counter:
  """{('conv', x, w, strides, padding, dims) | ('attention', q, k) | ('dense', x, w): count}."""
  import jax
  import jax.numpy as jnp
  import peer_models as pm
  from ldm_jax import kernels
  from ldm_jax.models import unet as unet_lib
  from ldm_jax.convert import unet as unet_convert
  from diffusers import UNet2DConditionModel
  kwargs = unet_convert.unet_kwargs_from_diffusers_config(
      dict(UNet2DConditionModel(**pm.UNET_CONFIG).config))
  model = unet_lib.UNetModel(**kwargs)
  inp = {k: jnp.asarray(v) for k, v in pm.unet_inputs(batch).items()}
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), inp["x"][:1], inp["t"][:1],
                                             inp["context"][:1]))["params"]
  found = collections.Counter()
  original = kernels.attention

  def recording_attention(q, k, v, **kw):
    found[("attention", tuple(q.shape), tuple(k.shape))] += 1
    return jnp.zeros_like(q)  # its matmuls are timed as attention, not as dense layers

  kernels.attention = recording_attention
  try:
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, inp["x"], inp["t"],
                                                 inp["context"]))(params)
  finally:
    kernels.attention = original
  _walk(jaxpr.jaxpr, found)
  return found


# -------------------------------------------------------------------------------------------------
# One shape in both frameworks
# -------------------------------------------------------------------------------------------------
def _timed_pair(jax_fn, torch_fn, inputs, cotangent, layouts, out_layout):
  """Forward and forward + backward callables of one function in both frameworks, same data.

  jax_fn(*inputs) runs in ldm_jax's layout; torch_fn gets each input transposed by its entry of
  `layouts` (None: as is) and its output is compared with jax_fn's transposed by `out_layout`.
  The backward takes `cotangent` (ldm_jax's layout) for every input's gradient.
  Returns (jax fwd, jax fwd + bwd, torch fwd, torch fwd + bwd, relative error of the forwards).
  """
  import jax
  import torch

  def to_torch(a, layout):
    return torch.from_numpy(np.ascontiguousarray(a if layout is None else a.transpose(layout)))

  def jax_both(args, ct):
    out, vjp = jax.vjp(jax_fn, *args)
    return (out,) + vjp(ct)

  jargs, jct = [jax.device_put(a) for a in inputs], jax.device_put(cotangent)
  jfwd, jboth = jax.jit(jax_fn), jax.jit(jax_both)
  targs = [to_torch(a, layout).requires_grad_() for a, layout in zip(inputs, layouts)]
  tct = to_torch(cotangent, out_layout)

  def torch_fwd():
    with torch.no_grad():
      return torch_fn(*targs)

  def torch_both():
    for t in targs:
      t.grad = None
    out = torch_fn(*targs)
    out.backward(tct)
    return out

  want = to_torch(np.array(jfwd(*jargs)), out_layout).numpy()  # a writable copy for torch
  err = float(np.abs(torch_fwd().numpy() - want).max() / max(1.0, np.abs(want).max()))
  return (lambda: jfwd(*jargs), lambda: jboth(jargs, jct), torch_fwd, torch_both, err)


def _conv_fns(key, rs):
  import jax
  import torch.nn.functional as F
  from jax import lax
  _, xs, ws, strides, padding, dims = key
  x, w = rs.randn(*xs).astype(np.float32), (rs.randn(*ws) * 0.05).astype(np.float32)
  conv = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims)
  dy = rs.randn(*jax.eval_shape(conv, x, w).shape).astype(np.float32)
  symmetric = all(lo == hi for lo, hi in padding)
  pad4 = [p for lo_hi in reversed(padding) for p in lo_hi]  # F.pad: last dimension first

  def torch_conv(x, w):
    if symmetric:
      return F.conv2d(x, w, stride=strides, padding=[lo for lo, _ in padding])
    return F.conv2d(F.pad(x, pad4), w, stride=strides)

  # torch in NCHW / OIHW: the spec tuples list (batch, feature, spatial...) positions.
  return _timed_pair(conv, torch_conv, (x, w), dy, (dims.lhs_spec, dims.rhs_spec),
                     dims.out_spec)


def _attention_fns(key, rs):
  import torch.nn.functional as F
  from ldm_jax import kernels
  _, qs, ks = key
  q, k, v, do = (rs.randn(*shape).astype(np.float32) for shape in (qs, ks, ks, qs))
  heads_first = (0, 2, 1, 3)  # torch: [B, heads, L, d]
  return _timed_pair(lambda q, k, v: kernels.attention(q, k, v), F.scaled_dot_product_attention,
                     (q, k, v), do, (heads_first,) * 3, heads_first)


def _dense_fns(key, rs):
  _, xs, ws = key
  x, w = rs.randn(*xs).astype(np.float32), (rs.randn(*ws) * 0.05).astype(np.float32)
  dy = rs.randn(*xs[:-1], ws[1]).astype(np.float32)
  matmul = lambda x, w: x @ w
  return _timed_pair(matmul, matmul, (x, w), dy, (None, None), None)


FNS = {"conv": _conv_fns, "attention": _attention_fns, "dense": _dense_fns}


def describe(key) -> str:
  if key[0] == "conv":
    _, xs, ws, strides, padding, _ = key
    extra = f" stride {strides[0]}" if strides != (1, 1) else ""
    extra += f" pad {padding}" if any(lo != hi for lo, hi in padding) else ""
    return f"{'x'.join(map(str, xs))} * {ws[0]}x{ws[1]} -> {ws[3]}{extra}"
  if key[0] == "attention":
    _, qs, ks = key
    return f"b{qs[0]} {qs[2]} heads x {qs[3]}: {qs[1]} q x {ks[1]} k"
  return f"{'x'.join(map(str, key[1]))} @ {key[2][0]}x{key[2][1]}"


def time_shape(key, repeats):
  import bench_util as bu
  jfwd, jboth, tfwd, tboth, err = FNS[key[0]](key, np.random.RandomState(0))
  if err > 1e-3:
    raise AssertionError(f"{describe(key)}: ldm_jax and torch disagree (relative error {err:.1e})")
  times, _ = bu.interleaved({"jax_fwd": jfwd, "torch_fwd": tfwd, "jax_both": jboth,
                             "torch_both": tboth}, repeats=repeats)
  return dict({k: bu.median(v) for k, v in times.items()}, error=err)


def main(argv=None) -> int:
  args = parse_args(argv)
  import torch
  torch.set_num_threads(args.threads)
  import bench_util as bu
  start = time.time()
  shapes = record_shapes(args.batch)
  record = dict(args=vars(args), versions=bu.versions(), rows=[])
  totals = collections.defaultdict(lambda: collections.Counter())
  header = (f"{'kind':9s} {'shape':44s} {'n':>3s} | {'fwd ms: jax':>11s} {'torch':>6s} | "
            f"{'fwd+bwd ms: jax':>15s} {'torch':>6s} {'ratio':>5s}")
  print(f"UNet batch {args.batch}: {sum(shapes.values())} kernels, {len(shapes)} shapes\n{header}")
  for key, n in sorted(shapes.items(), key=lambda kv: (KINDS.index(kv[0][0]), str(kv[0]))):
    if key[0] not in args.kinds:
      continue
    r = time_shape(key, args.repeats)
    record["rows"].append(dict(kind=key[0], shape=describe(key), count=n, **r))
    for k in ("jax_fwd", "torch_fwd", "jax_both", "torch_both"):
      totals[key[0]][k] += n * r[k]
    print(f"{key[0]:9s} {describe(key):44s} {n:3d} | {r['jax_fwd'] * 1e3:11.2f} "
          f"{r['torch_fwd'] * 1e3:6.2f} | {r['jax_both'] * 1e3:15.2f} {r['torch_both'] * 1e3:6.2f} "
          f"{r['torch_both'] / r['jax_both']:5.2f}x", flush=True)
  print("\ntotals over the UNet (time x occurrences), ms; ratio = torch / ldm_jax (> 1: faster)")
  for kind, t in totals.items():
    print(f"{kind:9s} fwd {t['jax_fwd'] * 1e3:8.1f} vs torch {t['torch_fwd'] * 1e3:8.1f} | "
          f"fwd+bwd {t['jax_both'] * 1e3:8.1f} vs torch {t['torch_both'] * 1e3:8.1f} "
          f"({t['torch_both'] / t['jax_both']:.2f}x; ldm_jax "
          f"{(t['jax_both'] - t['torch_both']) * 1e3:+.0f} ms)")
  record["totals"] = {k: dict(v) for k, v in totals.items()}
  bu.write_record(record, "kernels", args.out, start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
