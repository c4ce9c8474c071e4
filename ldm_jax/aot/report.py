"""Per-chip figures of a compiled program: memory against HBM, FLOPs, estimated time, MFU.

Everything comes from the program's abstract arguments and XLA's own analyses of the compiled
program (`memory_analysis()`, `cost_analysis()`), which describe one device of the SPMD program:
nothing here is measured on a TPU.
"""

import re
from typing import Any

import jax
import numpy as np

from ldm_jax.aot import topology

GIB = topology.GIB
# The train-state fields worth a line of their own (the rest are scalars and keys).
STATE_LABELS = {"params": "parameters", "opt_state": "optimizer state", "ema_params": "EMA",
                "disc_vars": "discriminator", "disc_opt_state": "discriminator optimizer"}
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


def per_chip_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def state_bytes(state: Any) -> dict[str, int]:
  """{field: bytes per chip} of a train state dataclass (params, opt_state, ema_params, ...)."""
  if state is None:
    return {}
  out = {}
  for name in state.__dataclass_fields__:
    value = getattr(state, name)
    if value is not None and jax.tree.leaves(value):
      out[name] = per_chip_bytes(value)
  return out


def memory(compiled) -> dict[str, int]:
  """XLA's memory analysis as {field: bytes}, with `total`: the peak when XLA reports one, else
  arguments + outputs - aliased (donated) + temporaries."""
  stats = compiled.memory_analysis()
  out = {name: int(getattr(stats, name)) for name in MEMORY_FIELDS
         if stats is not None and getattr(stats, name, None) is not None}
  if out.get("peak_memory_in_bytes", 0) > 0:
    out["total"] = out["peak_memory_in_bytes"]
  else:
    out["total"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0) -
                    out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
  return out


def cost(compiled) -> dict[str, float]:
  """flops, bytes accessed, transcendentals and the TPU cost model's `optimal_seconds` (per chip).

  `optimal_seconds` <= 0 means the cost model did not price the program (e.g. a while loop), and
  is dropped.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else {}
  out = {k.replace(" ", "_"): float(analysis[k]) for k in
         ("flops", "bytes accessed", "transcendentals", "optimal_seconds") if k in (analysis or {})}
  if out.get("optimal_seconds", 0.0) <= 0:
    out.pop("optimal_seconds", None)
  return out


def figures(*, chip: topology.Chip, num_chips: int, images: int, mem: dict, costs: dict,
            repeats: int = 1, resident_bytes: int = 0) -> dict[str, float]:
  """Fit and speed of one call: HBM use, estimated seconds, images/s/chip and MFU.

  The time is XLA's cost-model `optimal_seconds` when it prices the program; otherwise (libtpu
  reports a negative value for many programs) the roofline of XLA's own counts: the longer of
  FLOPs at bf16 peak and bytes accessed at HBM bandwidth. Either is a lower bound, so
  images/s/chip and MFU are upper bounds. `time_source` says which was used.
  repeats: how many times `costs` (one call of a smaller program, e.g. one sampler step) runs in
  the call, as XLA's cost analysis counts a loop body once.
  resident_bytes: held on the chip besides the program's own buffers; counted in the fit.
  """
  used = mem["total"] + resident_bytes
  out: dict[str, Any] = {"hbm_bytes": chip.hbm_bytes, "used_bytes": used,
                         "resident_bytes": resident_bytes, "fits": used <= chip.hbm_bytes,
                         "hbm_fraction": used / chip.hbm_bytes}
  flops = costs.get("flops", 0.0) * repeats
  moved = costs.get("bytes_accessed", 0.0) * repeats
  if flops > 0:
    out["flops"] = flops
    out["seconds_at_peak"] = flops / chip.peak_bf16_flops
  if moved > 0:
    out["bytes_accessed"] = moved
    out["seconds_at_hbm_bandwidth"] = moved / chip.hbm_bytes_per_second
  if "optimal_seconds" in costs:
    out["seconds"], out["time_source"] = costs["optimal_seconds"] * repeats, "xla_cost_model"
  elif flops > 0 or moved > 0:
    out["seconds"] = max(out.get("seconds_at_peak", 0.0), out.get("seconds_at_hbm_bandwidth", 0.0))
    out["time_source"] = "roofline"
  if out.get("seconds", 0) > 0:
    out["images_per_second_per_chip"] = images / num_chips / out["seconds"]
    if flops > 0:
      out["mfu"] = flops / (out["seconds"] * chip.peak_bf16_flops)
  return out


def advice(config, *, chip: topology.Chip, num_chips: int, figures: dict, mem: dict,
           states: dict, batch_per_chip: int) -> list[str]:
  """When a train step does not fit: by how much, and the config knobs that would help."""
  used, resident = figures["used_bytes"], figures.get("resident_bytes", 0)
  over = used - chip.hbm_bytes
  if over <= 0:
    return []
  tips = [f"needs {gib(used)} of the {chip.name}'s {gib(chip.hbm_bytes)} HBM: {gib(over)} over."]
  temp = mem.get("temp_size_in_bytes", 0)
  if batch_per_chip > 1 and temp:
    tips.append(f"batch: activations ({gib(temp)}) scale with the batch per chip "
                f"({batch_per_chip}); try --batch_per_chip={max(1, batch_per_chip // 2)}.")
  if "train" in config and not config.train.get("remat", True) and config.stage == "ldm":
    tips.append("remat: --config.train.remat=True recomputes UNet block activations in the "
                "backward pass.")
  fsdp = int(config.mesh.fsdp)
  held = sum(states.values())
  if fsdp < num_chips and held:
    saved = held - held * fsdp / num_chips
    tips.append(f"fsdp: --config.mesh.fsdp={num_chips} splits parameters, optimizer state and EMA "
                f"over all {num_chips} chips (saves about {gib(saved)} per chip).")
  if config.train.get("compute_dtype", "float32") == "float32":
    tips.append("bf16: --config.train.compute_dtype=bfloat16 halves activation memory.")
  if config.train.get("use_ema") and states.get("ema_params"):
    tips.append(f"EMA: --config.train.use_ema=False frees {gib(states['ema_params'])} per chip.")
  if resident and config.stage == "ldm":  # The latent cache feeds stage 2's trainer.
    tips.append(f"precomputed latents / text embeddings (data.source='latent_cache') would keep "
                f"the frozen encoders ({gib(resident)}) off the chip.")
  return tips


def gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


# XLA's TPU compiler, refusing a program too large for the chip (sizes in its binary units).
_HBM_REFUSAL = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds "
                          r"available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def hbm_refusal(message: str) -> dict[str, int] | None:
  """{temp_bytes, available_bytes} from XLA's TPU compiler refusing a program whose temporaries
  exceed the chip's HBM ("RESOURCE_EXHAUSTED: Ran out of memory on HBM ..."), else None."""
  found = _HBM_REFUSAL.search(message)
  if found is None:
    return None
  temp, temp_unit, available, available_unit = found.groups()
  return {"temp_bytes": int(float(temp) * _UNITS[temp_unit]),
          "available_bytes": int(float(available) * _UNITS[available_unit])}


# A while instruction of compiled HLO text, and its condition computation's name.
_WHILE = re.compile(r"\bwhile\([^\n]*?condition=%?([\w.-]+)")


def loops(hlo_text: str) -> dict[str, int]:
  """How many while loops a compiled program holds, and how many of them are XLA's windowed
  einsums (an all-gather or reduce-scatter overlapped with its dot, one shard per iteration,
  which XLA's TPU compiler makes of FSDP's gathered matmuls and convolutions on larger meshes).

  XLA's cost analysis counts a loop body once, so a program with windowed einsums reports fewer
  FLOPs and bytes than it runs (`undercount_note`).
  """
  conditions = _WHILE.findall(hlo_text)
  return {"while": len(conditions),
          "windowed_einsum": sum("windowed_dot_general" in c for c in conditions)}


def undercount_note(result: dict) -> str | None:
  """Why a compiled program's FLOP and byte counts are too low, or None."""
  n = result.get("loops", {}).get("windowed_einsum", 0)
  if not n:
    return None
  return (f"{n} windowed-einsum loops (collective matmuls): XLA counts each loop body once, so "
          f"the FLOPs, bytes and times above are undercounts")


def format_program(result: dict) -> list[str]:
  """Text lines for one program's result (see `ldm_jax.aot.__main__`)."""
  lines = [f"== {result['name']}: {result['images']} images per call "
           f"({result.get('batch_per_chip', '?')} per chip); traced in "
           f"{result['lower_seconds']:.1f} s, compiled in {result['compile_seconds']:.1f} s "
           f"({result['compile_cpu_seconds']:.1f} CPU s)"]
  for name, n in result.get("state_bytes", {}).items():
    if name in STATE_LABELS:
      lines.append(f"  {STATE_LABELS[name] + ' per chip':32s} {gib(n)}")
  mem = result["memory"]
  for key, label in (("argument_size_in_bytes", "arguments"), ("output_size_in_bytes", "outputs"),
                     ("alias_size_in_bytes", "aliased (donated)"),
                     ("temp_size_in_bytes", "temporaries"),
                     ("generated_code_size_in_bytes", "generated code"),
                     ("peak_memory_in_bytes", "peak")):
    if key in mem:
      lines.append(f"  {label:32s} {gib(mem[key])}")
  fig = result["figures"]
  verdict = "fits" if fig["fits"] else "does NOT fit"
  if "refused" in result:
    lines.append(f"  ! {result['refused']}")
  lines.append(f"  {'total of the program':32s} {gib(mem['total'])}")
  if fig.get("resident_bytes"):
    lines.append(f"  {'+ frozen encoders (outside it)':32s} {gib(fig['resident_bytes'])}")
  lines.append(f"  {'per chip':32s} {gib(fig['used_bytes'])} of {gib(fig['hbm_bytes'])} HBM "
               f"({100 * fig['hbm_fraction']:.0f}%): {verdict}")
  if "cost_from" in result:
    lines.append(f"  {'FLOPs and time from':32s} {result['cost_from']}")
  if "flops" in fig:
    lines.append(f"  {'FLOPs per chip':32s} {fig['flops']:.3e} "
                 f"({1e3 * fig['seconds_at_peak']:.2f} ms at bf16 peak)")
  if "bytes_accessed" in fig:
    lines.append(f"  {'HBM bytes accessed per chip':32s} {gib(fig['bytes_accessed'])} "
                 f"({1e3 * fig['seconds_at_hbm_bandwidth']:.2f} ms at HBM bandwidth)")
  if "seconds" in fig:
    source = {"xla_cost_model": "XLA cost-model time",
              "roofline": "roofline time (no XLA time)"}[fig["time_source"]]
    lines.append(f"  {source:32s} {1e3 * fig['seconds']:.2f} ms (a lower bound)")
    if "images_per_second_per_chip" in fig:
      lines.append(f"  {'images/s/chip (at most)':32s} {fig['images_per_second_per_chip']:.2f}")
    if "mfu" in fig:
      lines.append(f"  {'MFU at that time':32s} {100 * fig['mfu']:.1f}%")
  elif "refused" not in result:
    lines.append("  XLA reported neither a time nor FLOPs for this program.")
  note = undercount_note(result)
  if note:
    lines.append(f"  ! {note}")
  for tip in result.get("advice", []):
    lines.append(f"  ! {tip}")
  return lines
