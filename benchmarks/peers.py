"""ldm_jax against diffusers' torch models and diffusers' Flax models, same weights, one run.

    .venv/bin/pip install --no-deps --target .venv/bench-deps diffusers==0.39.0   # once
    .venv/bin/python benchmarks/peers.py                          # every row (~12 min on 2 cores)
    .venv/bin/python benchmarks/peers.py --rows unet,train --batch 2,8 --repeats 5

Rows (peer_models.py): `unet` forward and `train` step (forward + backward + AdamW) of the text UNet at
each --batch; `decode` (kl-f8 decoder, 32x32x4 -> 256 px, batch 2); `sample` (50 DDIM steps with
classifier-free guidance, batch 2, decode included); `loop` (ldm_jax's compiled sampling loop
against the same number of separate guided UNet calls: the loop's own overhead); `ae_train` (the
shapes kl-f4 autoencoder step with LPIPS and the PatchGAN, `benchmarks/ae_peers.py`).

Method: every peer runs the same architecture with the same random weights (imported, and checked
to agree before timing); peers are timed round-robin (A, B, C, A, B, C, ...) after a warm-up, and
the median is reported. torch runs with torch.set_num_threads(--threads) under no_grad for
inference; JAX functions are compiled ahead of time (the compile column is jit + lower + compile).
FLOPs are XLA's cost analysis of the ldm_jax program (the torch peer computes the same function);
MFU divides achieved FLOP/s by the best dense f32 matmul rate measured in this run. 'XLA temp' is
`memory_analysis().temp_size_in_bytes`; 'first RSS' the sampled process RSS growth during a peer's first call.
Results go to benchmarks/results/peers-<time>.json; `ratio` is torch time / peer time (> 1 faster).
"""

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# diffusers 0.39.0 (the last release with the Flax models) shadows the venv's newer diffusers.
sys.path.insert(0, os.path.join(ROOT, ".venv", "bench-deps"))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import ldm_jax  # noqa: E402,F401  (sets its XLA:CPU flags before JAX starts)
import numpy as np  # noqa: E402

ROWS = ("unet", "train", "decode", "sample", "loop", "ae_train")
GUIDANCE = 7.5
SCALE_FACTOR = 0.18215
PEERS = ("torch", "ldm_jax", "diffusers_flax")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {ROWS}")
  p.add_argument("--batch", default="2,8", help="UNet forward / train-step batch sizes")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds of the fast rows")
  p.add_argument("--slow_repeats", type=int, default=2, help="timed rounds of decode / sample")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps of the sample row")
  p.add_argument("--loop_steps", type=int, default=10, help="steps of the loop-overhead row")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  p.add_argument("--single_thread", action="store_true",
                 help="pin the process to one core (steadier ratios on a shared machine)")
  p.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {PEERS}")
  p.add_argument("--remat", action="store_true", help="also time ldm_jax's train step with remat")
  p.add_argument("--out", default="", help="JSON path (default benchmarks/results/peers-*.json)")
  args = p.parse_args(argv)
  args.rows = [r for r in args.rows.split(",") if r]
  args.peers = [r for r in args.peers.split(",") if r]
  args.batch = [int(b) for b in args.batch.split(",") if b]
  for field, values, known in (("--rows", args.rows, ROWS), ("--peers", args.peers, PEERS)):
    bad = [v for v in values if v not in known]
    if bad:
      p.error(f"{field}={bad}; expected names from {known}")
  return args


# -------------------------------------------------------------------------------------------------
# Measurement
# -------------------------------------------------------------------------------------------------
def measure(fns, repeats, warmup=1, compiled=None, flops=None):
  """Interleaved medians of fns {peer: callable}, plus compile / FLOP / memory figures."""
  import bench_util as bu
  times, rss = bu.interleaved(fns, repeats=repeats, warmup=warmup)
  out = {}
  for name in fns:
    info = {k: v for k, v in (compiled or {}).get(name, {}).items() if k != "compiled"}
    info.update(times=times[name], median_s=bu.median(times[name]), peak_rss=rss.get(name, 0))
    if flops is not None and "flops" not in info:
      info["flops"] = flops
    out[name] = info
  return out


def _torch_inputs(inp):
  import torch
  from peer_models import nchw
  return (torch.from_numpy(nchw(inp["x"])), torch.from_numpy(inp["t"]).long(),
          torch.from_numpy(inp["context"]))


def _copy_tree(tree):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(jnp.array, tree)  # fresh buffers: donation must not eat the shared params


# -------------------------------------------------------------------------------------------------
# Rows
# -------------------------------------------------------------------------------------------------
def row_unet(unet, batch, args):
  import jax.numpy as jnp
  import torch
  import bench_util as bu
  from peer_models import nchw, nhwc, relative_error, unet_inputs
  inp = unet_inputs(batch)
  x, t, c = (jnp.asarray(inp[k]) for k in ("x", "t", "context"))
  tx, tt, tc = _torch_inputs(inp)
  comp = {"ldm_jax": bu.jax_compiled(
      lambda p, x, t, c: unet.ours.apply({"params": p}, x, t, c), unet.ours_params, x, t, c)}
  fns = {}
  if "torch" in args.peers:
    def torch_fn():
      with torch.no_grad():
        return unet.torch(tx, tt, encoder_hidden_states=tc).sample
    fns["torch"] = torch_fn
  fns["ldm_jax"] = lambda: comp["ldm_jax"]["compiled"](unet.ours_params, x, t, c)
  if "diffusers_flax" in args.peers:
    xf = jnp.asarray(nchw(inp["x"]))
    comp["diffusers_flax"] = bu.jax_compiled(
        lambda p, x, t, c: unet.flax.apply({"params": p}, x, t, c).sample,
        unet.flax_params, xf, t, c)
    fns["diffusers_flax"] = lambda: comp["diffusers_flax"]["compiled"](unet.flax_params, xf, t, c)
  if "torch" in fns:  # sanity at the timed batch, on the compiled programs
    want = nhwc(fns["torch"]().numpy())
    for name in ("ldm_jax", "diffusers_flax"):
      if name in fns:
        got = np.asarray(fns[name]())
        err = relative_error(got if name == "ldm_jax" else nhwc(got), want)
        if err > 1e-3:
          raise AssertionError(f"unet batch {batch}: {name} differs from torch by {err:.3g}")
  return measure(fns, args.repeats, compiled=comp, flops=comp["ldm_jax"]["flops"])


def _jax_train_step(apply_fn):
  """(state, x, t, c, noise) -> (state, loss): eps-MSE, value_and_grad, AdamW; state donated."""
  import jax
  import jax.numpy as jnp
  import optax
  tx = optax.adamw(1e-4)

  def step(state, x, t, c, noise):
    params, opt_state = state
    loss_fn = lambda p: jnp.mean(jnp.square(apply_fn(p, x, t, c) - noise))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return tx, step


def row_train(unet, batch, args, unet_remat=None):
  import jax.numpy as jnp
  import torch
  import bench_util as bu
  from peer_models import nchw, unet_inputs
  inp = unet_inputs(batch)
  noise = np.random.RandomState(9).randn(*inp["x"].shape).astype(np.float32)
  x, t, c, n = (jnp.asarray(v) for v in (inp["x"], inp["t"], inp["context"], noise))
  jax_peers = {"ldm_jax": (unet.ours, unet.ours_params, x, n,
                           lambda m: lambda p, x, t, c: m.apply({"params": p}, x, t, c))}
  if unet_remat is not None:
    jax_peers["ldm_jax_remat"] = (unet_remat, unet.ours_params, x, n, jax_peers["ldm_jax"][4])
  if "diffusers_flax" in args.peers:
    jax_peers["diffusers_flax"] = (
        unet.flax, unet.flax_params, jnp.asarray(nchw(inp["x"])), jnp.asarray(nchw(noise)),
        lambda m: lambda p, x, t, c: m.apply({"params": p}, x, t, c).sample)
  comp, fns, states = {}, {}, {}
  if "torch" in args.peers:
    model = copy.deepcopy(unet.torch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tx_, tt, tc = _torch_inputs(inp)
    tn = torch.from_numpy(nchw(noise))

    def torch_fn():
      opt.zero_grad(set_to_none=True)
      loss = torch.mean(torch.square(model(tx_, tt, encoder_hidden_states=tc).sample - tn))
      loss.backward()
      opt.step()
      return loss.detach()
    fns["torch"] = torch_fn
  for name, (module, params, xin, nin, make_apply) in jax_peers.items():
    tx, step = _jax_train_step(make_apply(module))
    params = _copy_tree(params)
    states[name] = (params, tx.init(params))
    comp[name] = bu.jax_compiled(step, states[name], xin, t, c, nin, donate_argnums=(0,))

    def jax_fn(name=name, xin=xin, nin=nin):
      states[name], loss = comp[name]["compiled"](states[name], xin, t, c, nin)
      return loss
    fns[name] = jax_fn
  return measure(fns, args.repeats, compiled=comp, flops=comp["ldm_jax"]["flops"])


def row_decode(vae, batch, args):
  import jax.numpy as jnp
  import torch
  import bench_util as bu
  from peer_models import LATENT, nchw, nhwc, relative_error
  z_np = np.random.RandomState(3).randn(batch, LATENT, LATENT, 4).astype(np.float32)
  z, zf, tz = jnp.asarray(z_np), jnp.asarray(nchw(z_np)), torch.from_numpy(nchw(z_np))
  comp = {"ldm_jax": bu.jax_compiled(
      lambda p, z: vae.ours.apply({"params": p}, z, method=vae.ours.decode), vae.ours_params, z)}
  fns = {}
  if "torch" in args.peers:
    def torch_fn():
      with torch.no_grad():
        return vae.torch.decode(tz).sample
    fns["torch"] = torch_fn
  fns["ldm_jax"] = lambda: comp["ldm_jax"]["compiled"](vae.ours_params, z)
  if "diffusers_flax" in args.peers:
    comp["diffusers_flax"] = bu.jax_compiled(
        lambda p, z: vae.flax.apply({"params": p}, z, method=vae.flax.decode).sample,
        vae.flax_params, zf)
    fns["diffusers_flax"] = lambda: comp["diffusers_flax"]["compiled"](vae.flax_params, zf)
  if "torch" in fns:
    want = nhwc(fns["torch"]().numpy())
    err = relative_error(np.asarray(fns["ldm_jax"]()), want)
    if err > 1e-3:
      raise AssertionError(f"decode: ldm_jax differs from torch by {err:.3g}")
  return measure(fns, args.slow_repeats, compiled=comp, flops=comp["ldm_jax"]["flops"])


def _sd_schedules():
  """SD's schedule ('scaled_linear' 0.00085 -> 0.012) in ldm_jax, torch DDIM and Flax DDIM."""
  from diffusers import DDIMScheduler, FlaxDDIMScheduler
  from ldm_jax.diffusion.schedules import Schedule
  cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
             steps_offset=1)
  ours = Schedule.create("linear", 1000, linear_start=0.00085, linear_end=0.012)
  return ours, DDIMScheduler(**cfg, timestep_spacing="leading"), FlaxDDIMScheduler(**cfg)


def sampling_programs(unet, vae, steps, decode=True):
  """{peer: fn(unet_params, vae_params, x_T, uncond, cond) -> images or latents}; torch eager."""
  import jax
  import jax.numpy as jnp
  import torch
  from ldm_jax.diffusion import guidance, samplers
  ours_schedule, torch_sched, flax_sched = _sd_schedules()
  guided = guidance.classifier_free_guidance(
      lambda x, t, cond: unet.ours.apply({"params": cond[1]}, x, t, cond[0]), GUIDANCE)

  def ours(params, vae_params, x_T, uncond, cond):
    # params = (UNet params, schedule): a traced schedule, because `samplers.sample` inspects a
    # concrete one on the host, which cannot happen inside this outer jit.
    params, schedule = params
    z = samplers.sample(guided, schedule, x_T, (uncond, cond, params),
                        jax.random.PRNGKey(0), sampler="ddim", steps=steps)  # [B, 32, 32, 4]
    if not decode:
      return z
    return vae.ours.apply({"params": vae_params}, z / SCALE_FACTOR, method=vae.ours.decode)

  def flax(params, vae_params, x_T, uncond, cond):  # as FlaxStableDiffusionPipeline._generate
    state = flax_sched.set_timesteps(flax_sched.create_state(), steps, x_T.shape)
    context = jnp.concatenate([uncond, cond])  # [2B, 77, 256]

    def body(i, carry):
      x, state = carry
      t = state.timesteps[i]
      eps = unet.flax.apply({"params": params}, jnp.concatenate([x, x]),
                            jnp.broadcast_to(t, (2 * x.shape[0],)), context).sample
      eps_u, eps_c = jnp.split(eps, 2)
      eps = eps_u + GUIDANCE * (eps_c - eps_u)
      return flax_sched.step(state, eps, t, x).to_tuple()

    z, _ = jax.lax.fori_loop(0, steps, body, (x_T * state.init_noise_sigma, state))
    if not decode:
      return z
    return vae.flax.apply({"params": vae_params}, z / SCALE_FACTOR, method=vae.flax.decode).sample

  def torch_fn(x_T, uncond, cond):  # as StableDiffusionPipeline's denoising loop
    with torch.no_grad():
      torch_sched.set_timesteps(steps)
      x, context = x_T, torch.cat([uncond, cond])
      for t in torch_sched.timesteps:
        eps = unet.torch(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        eps_u, eps_c = eps.chunk(2)
        x = torch_sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
      return vae.torch.decode(x / SCALE_FACTOR).sample if decode else x

  return dict(ldm_jax=ours, diffusers_flax=flax, torch=torch_fn), ours_schedule


def _unet_flops(unet, batch) -> float:
  """XLA's FLOP count of one ldm_jax UNet forward at `batch` (from the lowering: no compile)."""
  import bench_util as bu
  from peer_models import unet_inputs
  inp = unet_inputs(batch)
  return bu.unrolled_flops(lambda p, x, t, c: unet.ours.apply({"params": p}, x, t, c),
                           unet.ours_params, inp["x"], inp["t"], inp["context"])


def row_sample(unet, vae, batch, args, decode_flops=None):
  import jax.numpy as jnp
  import torch
  import bench_util as bu
  from peer_models import CONTEXT, LATENT, nchw, nhwc, relative_error
  rs = np.random.RandomState(11)
  x_T = rs.randn(batch, LATENT, LATENT, 4).astype(np.float32)
  unc, cond = (rs.randn(batch, *CONTEXT).astype(np.float32) for _ in range(2))
  progs, schedule = sampling_programs(unet, vae, args.steps)
  jargs = {"ldm_jax": ((unet.ours_params, schedule), vae.ours_params, jnp.asarray(x_T)),
           "diffusers_flax": (unet.flax_params, vae.flax_params, jnp.asarray(nchw(x_T)))}
  ju, jc = jnp.asarray(unc), jnp.asarray(cond)
  comp, fns = {}, {}
  if "torch" in args.peers:
    targs = (torch.from_numpy(nchw(x_T)), torch.from_numpy(unc), torch.from_numpy(cond))
    fns["torch"] = lambda: progs["torch"](*targs)
  for name in ("ldm_jax", "diffusers_flax"):
    if name == "ldm_jax" or name in args.peers:
      comp[name] = bu.jax_compiled(progs[name], *jargs[name], ju, jc)
      fns[name] = lambda name=name: comp[name]["compiled"](*jargs[name], ju, jc)
  # XLA counts a loop body once; the loop's FLOPs are steps x the guided (2B) UNet + one decode.
  flops = None
  if decode_flops is not None:
    flops = args.steps * _unet_flops(unet, 2 * batch) + decode_flops
  for info in comp.values():
    info.pop("flops", None)
  result = measure(fns, args.slow_repeats, warmup=0, compiled=comp, flops=flops)
  if "torch" in fns:  # agreement after 50 guided steps, recorded (guidance amplifies fp32 noise)
    want = nhwc(fns["torch"]().numpy())
    for name in comp:
      got = np.asarray(fns[name]())
      result[name]["error_vs_torch"] = relative_error(got if name == "ldm_jax" else nhwc(got),
                                                      want)
  return result


def row_loop(unet, batch, args):
  """ldm_jax's compiled DDIM loop (no decode) against loop_steps separate guided UNet calls."""
  import jax
  import jax.numpy as jnp
  import bench_util as bu
  from peer_models import CONTEXT, LATENT
  rs = np.random.RandomState(12)
  x_T = jnp.asarray(rs.randn(batch, LATENT, LATENT, 4).astype(np.float32))
  unc, cond = (jnp.asarray(rs.randn(batch, *CONTEXT).astype(np.float32)) for _ in range(2))
  progs, schedule = sampling_programs(unet, None, args.loop_steps, decode=False)
  loop = lambda p, x, u, c: progs["ldm_jax"](p, None, x, u, c)
  comp = {"loop": bu.jax_compiled(loop, (unet.ours_params, schedule), x_T, unc, cond)}

  def one_call(p, x, u, c):  # the guided UNet call a step makes, nothing else
    out = unet.ours.apply({"params": p}, jnp.concatenate([x, x]),
                          jnp.full((2 * batch,), 500, jnp.int32), jnp.concatenate([u, c]))
    out_u, out_c = jnp.split(out, 2)
    return out_u + GUIDANCE * (out_c - out_u)
  comp["unet_calls"] = bu.jax_compiled(one_call, unet.ours_params, x_T, unc, cond)

  def calls():
    out = None
    for _ in range(args.loop_steps):
      out = comp["unet_calls"]["compiled"](unet.ours_params, x_T, unc, cond)
    return out
  fns = {"loop": lambda: comp["loop"]["compiled"]((unet.ours_params, schedule), x_T, unc, cond),
         "unet_calls": calls}
  del jax
  return measure(fns, args.repeats, compiled=comp)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------
def table(results, peak_flops) -> str:
  """One line per (row, peer): median ms, ratio to torch, compile, GFLOP, MFU, memory."""
  head = (f"{'row':<16}{'peer':<16}{'median ms':>11}{'vs torch':>9}{'compile s':>10}"
          f"{'GFLOP':>9}{'GFLOP/s':>9}{'MFU':>7}{'XLA temp MiB':>13}{'first RSS MiB':>14}")
  lines = [head, "-" * len(head)]
  for row, peers in results.items():
    torch_s = peers.get("torch", {}).get("median_s")
    for peer, r in peers.items():
      ms = 1e3 * r["median_s"]
      ratio = f"{torch_s / r['median_s']:.2f}x" if torch_s else "-"
      flops = r.get("flops")
      has_flops = flops is not None and np.isfinite(flops)
      gflop = f"{flops / 1e9:.1f}" if has_flops else "-"
      rate = f"{flops / r['median_s'] / 1e9:.1f}" if has_flops else "-"
      mfu = f"{flops / r['median_s'] / peak_flops:.0%}" if has_flops else "-"
      temp = r.get("temp_bytes")
      temp = f"{temp / 2**20:.0f}" if temp is not None and np.isfinite(temp) else "-"
      comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
      lines.append(f"{row:<16}{peer:<16}{ms:>11.1f}{ratio:>9}{comp:>10}{gflop:>9}{rate:>9}"
                   f"{mfu:>7}{temp:>13}{r['peak_rss'] / 2**20:>14.0f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.single_thread:
    # XLA's flags alone do not do it (its YNNPACK kernels keep their own thread pool: a "single
    # threaded" jnp matmul still ran at two cores' rate), so the process is pinned to one core.
    args.threads = 1
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import torch
  torch.set_num_threads(args.threads)
  import bench_util as bu
  import peer_models as pm
  start = time.time()
  record = dict(args=vars(args), versions=bu.versions(), results={})
  peak = bu.matmul_peak()
  record["matmul_peak_flops"] = peak
  peak_flops = max(peak.values())
  print(f"dense f32 matmul peak: jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peak['torch'] / 1e9:.1f} GFLOP/s; torch threads {torch.get_num_threads()}", flush=True)
  results = record["results"]
  needs_unet = any(r in args.rows for r in ("unet", "train", "sample", "loop"))
  needs_vae = any(r in args.rows for r in ("decode", "sample"))
  unet = pm.build_unet() if needs_unet else None
  vae = pm.build_vae() if needs_vae else None
  unet_remat = None
  if args.remat and "train" in args.rows:
    unet_remat = unet.ours.clone(remat=True)
  decode_flops = None
  for row in args.rows:
    if row == "unet":
      for b in args.batch:
        results[f"unet b{b}"] = row_unet(unet, b, args)
    elif row == "train":
      for b in args.batch:
        results[f"train b{b}"] = row_train(unet, b, args, unet_remat)
    elif row == "decode":
      results["decode b2"] = row_decode(vae, 2, args)
      decode_flops = results["decode b2"]["ldm_jax"]["flops"]
    elif row == "sample":
      results["sample b2"] = row_sample(unet, vae, 2, args, decode_flops)
    elif row == "loop":
      results["loop b2"] = row_loop(unet, 2, args)
    elif row == "ae_train":
      import ae_peers
      results["ae_train b16"] = ae_peers.row_ae_train(args)
    print(table({k: v for k, v in results.items() if k.split()[0] == row}, peak_flops),
          flush=True)
  print("\n" + table(results, peak_flops))
  if "loop b2" in results:
    loop = results["loop b2"]
    overhead = loop["loop"]["median_s"] / loop["unet_calls"]["median_s"] - 1
    record["loop_overhead"] = overhead
    print(f"sampling loop overhead over its {args.loop_steps} guided UNet calls: {overhead:+.1%}")
  bu.write_record(record, "peers", args.out, start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
