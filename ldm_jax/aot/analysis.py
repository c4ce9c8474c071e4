"""Compiles a config's programs for a TPU topology and analyses them (`python -m ldm_jax.aot`).

    out = analyse(config, "v5e:2x2", batch_per_chip=2, train=True, sample=True,
                  sample_batch_per_chip=8, sample_steps=50, guidance=7.5)

`out` is JSON-able: the topology and mesh, and per program (every stage's train_step; stage 2's
sample_step and sample_loop with sampling) its compile time, per-chip state bytes, XLA's memory
and cost analyses, the derived figures (`report.figures`) and, for a train step that does not fit,
advice.
"""

import logging
from typing import Any, Callable

from ldm_jax import validate
from ldm_jax.aot import programs, report, topology
from ldm_jax.train import lora
from ldm_jax.train import loop

log = logging.getLogger("ldm_jax.aot")

# config.stage -> its train step's builder.
_TRAIN_STEPS = {"autoencoder": programs.ae_train_step, "ldm": programs.ldm_train_step,
                "classifier": programs.classifier_train_step}


class AotError(ValueError):
  """A mistake in the flags or the config: one line, exit code 2."""


def analyse(config, topology_name: str, *, batch_per_chip: int = 0, train: bool = True,
            sample: bool = False, sample_batch_per_chip: int = 8, sample_steps: int = 50,
            guidance: float = 7.5, on_compiled: Callable[[str, Any], None] | None = None,
            lower_only: bool = False, attention_kernel: bool = True) -> dict:
  """Compiles and analyses the programs; returns the JSON-able report.

  batch_per_chip: sets config.data.batch_size to it times the chips (0 keeps the config's).
  on_compiled(name, compiled): sees each compiled program (e.g. to inspect its HLO).
  lower_only: trace and lower each program for the topology (its shardings, kernels and shapes
    checked) without XLA's compile, in seconds instead of minutes; no memory or cost figures.
  attention_kernel: False keeps TPU attention in its one-block einsum form (no Pallas kernel), to
    measure what the kernel saves.
  Raises AotError for an unknown topology or a config that cannot run on it.
  """
  try:
    chip, devices = topology.tpu_devices(topology_name)
  except topology.TopologyError as e:
    raise AotError(str(e)) from None
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if batch_per_chip:
      config.data.batch_size = int(batch_per_chip) * len(devices)
  try:
    validate.check_config(config, num_devices=len(devices))
    mesh = loop.make_mesh(config, devices)
  except ValueError as e:
    raise AotError(f"--config: {e}") from None
  # The programs built here: each stage's train step, and stage 2's sampler.
  if config.stage not in _TRAIN_STEPS:
    raise AotError(f"--config: config.stage={config.stage!r}; ahead-of-time compilation covers "
                   f"the {', '.join(map(repr, _TRAIN_STEPS))} stages.")
  if train and lora.enabled(config):
    raise AotError(f"--config: config.lora.rank={config.lora.rank}: the LoRA train step is not "
                   f"built here (it would be reported as a full fine-tune); set "
                   f"--config.lora.rank=0 for the full step, or --notrain --sample.")
  n = int(mesh.devices.size)
  shards = n // int(mesh.shape.get("tensor", 1))
  if train and config.data.batch_size % shards:  # The sampling batch is set by its own flag.
    raise AotError(f"--config.data.batch_size={config.data.batch_size}: expected a multiple of "
                   f"the {shards} batch shards of {topology_name} (or set --batch_per_chip).")
  out = {"topology": topology_name, "chip": chip.name, "num_chips": n,
         "mesh": {k: int(v) for k, v in mesh.shape.items()},
         "compute_dtype": config.train.compute_dtype, "remat": bool(config.train.remat),
         "attention": "pallas" if attention_kernel else "einsum",
         "programs": []}

  def one(program, *, repeats_of=None, repeats=1):
    if lower_only:  # Traced and lowered with the topology's shardings, not compiled: no analyses.
      log.info("%s: tracing and lowering for %s ...", program.name, topology_name)
      _, seconds = programs.lower_program(program, attention_kernel)
      return {"name": program.name, "images": program.images, "lower_seconds": seconds["trace"],
              "lower_cpu_seconds": seconds["trace_cpu"],
              "state_bytes": report.state_bytes(program.state)}, None
    log.info("%s: tracing and compiling for %s ...", program.name, topology_name)
    refused = compiled = None
    try:
      compiled, seconds = programs.compile_program(program, attention_kernel)
    except programs.HbmRefusal as e:
      refused, seconds = e, e.seconds
    log.info("%s: traced in %.1f s, compiled in %.1f s (%.1f CPU s)%s", program.name,
             seconds["trace"], seconds["compile"], seconds["compile_cpu"],
             "; refused: too large for the chip" if refused else "")
    if compiled is not None and on_compiled is not None:
      on_compiled(program.name, compiled)
    if refused is None:
      mem, costs = report.memory(compiled), report.cost(compiled)
      loops = report.loops(compiled.as_text())
    else:
      # No analyses of a program XLA would not build: its arguments (exact, from their shardings)
      # and the temporaries the compiler said it needs; no FLOPs or time.
      arguments = report.per_chip_bytes(program.args)
      mem = {"argument_size_in_bytes": arguments, "temp_size_in_bytes": refused.temp_bytes,
             "total": arguments + refused.temp_bytes}
      costs, loops = {}, {}
    result = {"name": program.name, "images": program.images, "lower_seconds": seconds["trace"],
              "compile_seconds": seconds["compile"], "lower_cpu_seconds": seconds["trace_cpu"],
              "compile_cpu_seconds": seconds["compile_cpu"],
              "state_bytes": report.state_bytes(program.state), "memory": mem, "cost": costs,
              "loops": loops}
    if refused is not None:
      result["refused"] = (f"XLA's TPU compiler refused it: its temporaries alone need "
                           f"{report.gib(refused.temp_bytes)}, the chip has "
                           f"{report.gib(refused.available_bytes)} for them")
    if repeats_of is not None:  # Time and FLOPs from another program, run `repeats` times.
      costs = repeats_of["cost"]
      result["cost_from"] = f"{repeats_of['name']} x {repeats}"
    result["figures"] = report.figures(chip=chip, num_chips=n, images=program.images, mem=mem,
                                       costs=costs, repeats=repeats,
                                       resident_bytes=program.resident_bytes)
    return result, compiled

  if train:
    result, _ = one(_build(_TRAIN_STEPS[config.stage], config, mesh))
    result["batch_per_chip"] = config.data.batch_size // shards
    if not lower_only:
      result["advice"] = report.advice(config, chip=chip, num_chips=n,
                                       figures=result["figures"], mem=result["memory"],
                                       states=result["state_bytes"],
                                       batch_per_chip=result["batch_per_chip"])
    out["programs"].append(result)
  if sample:
    if config.stage != "ldm":
      raise AotError(f"--sample: a config.stage={config.stage!r} config has no sampling loop of "
                     f"its own (a classifier guides a diffusion model's: compile that model's "
                     f"config).")
    kw = dict(batch_per_chip=sample_batch_per_chip, guidance=guidance)
    step, _ = one(_build(programs.sample_step, config, mesh, **kw))
    loop_result, _ = one(_build(programs.sample_loop, config, mesh, steps=sample_steps, **kw),
                         repeats_of=step, repeats=sample_steps)
    for result in (step, loop_result):
      result["batch_per_chip"] = sample_batch_per_chip
    out["programs"] += [step, loop_result]
  return out


def _build(builder, config, mesh, **kwargs) -> programs.Program:
  """builder(config, mesh, **kwargs), with the model's own config errors as AotError."""
  log.info("%s: building abstract state and inputs ...", builder.__name__)
  try:
    return builder(config, mesh, **kwargs)
  except (ValueError, KeyError) as e:
    raise AotError(f"--config: {e}") from None
