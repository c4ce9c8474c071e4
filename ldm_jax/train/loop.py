"""The training skeleton's parts: workdir files, metric logging, resume, the host loop around a step.

`trainer.train` puts them together for both stages. The loop follows MaxText's habits: metrics are
fetched one step late so the host never waits on the device, checkpoints are saved asynchronously
with the data iterator state beside the model, and SIGTERM (preemption) saves and exits cleanly,
also when it arrives during a long sample or evaluation phase (see `run_loop`). (The skeleton
compiles the step before step 1 and logs its memory analysis.)
"""

import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import tqdm

from ldm_jax import model_io
from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.train import checkpoint as checkpoint_lib
from ldm_jax.train import preemption
from ldm_jax.train import step as step_lib

log = logging.getLogger("ldm_jax.train")


METRICS_FILE = layout.METRICS_FILE


class MetricWriter:
  """TensorBoard event files and `metrics.jsonl` (process 0 only) + a tqdm progress bar.

  `metrics.jsonl` holds one JSON object per logged step ({"step": ..., "loss": ...}); it is
  appended to, so a resumed run may repeat steps after its checkpoint: readers keep the last line
  of each step (see `read_metrics`).
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.main = parallel.is_main_process()
    self.writer = None
    self.jsonl = None
    if self.main:
      self.jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
      try:
        from tensorboardX import SummaryWriter  # Optional: absent means console only.
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("tensorboardX is not installed: metrics go to the console only.")
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not self.main,
                         dynamic_ncols=True, desc="train")

  def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.main:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
    self.jsonl.write(json.dumps(dict(values, step=int(step))) + "\n")
    self.jsonl.flush()  # A preempted or killed run keeps every step it logged.
    shown = {k: f"{values[k]:.4g}" for k in ("loss", "lr", "grad_norm") if k in values}
    self.bar.set_postfix(shown, refresh=False)

  def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    if self.main and self.writer is not None:
      self.writer.add_image(name, grid_uint8, step, dataformats="HWC")

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()
    if self.jsonl is not None:
      self.jsonl.close()
    if self.writer is not None:
      self.writer.close()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """config.json in the workdir (process 0), for people and for `sweep.py` summaries."""
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    # Atomic: sweep.py and people may read it while a resumed run rewrites it.
    model_io.write_text_atomic(layout.config_path(workdir),
                               config.to_json_best_effort(indent=2, sort_keys=True))


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  if parallel.is_main_process():  # Atomic like config.json: sweep.py reads it from live runs.
    model_io.write_text_atomic(
        layout.summary_path(workdir),
        json.dumps({k: (float(v) if np.ndim(v) == 0 else v) for k, v in summary.items()},
                   indent=2, sort_keys=True))


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """{step: metrics} from `<workdir>/metrics.jsonl`; a repeated step keeps its last line."""
  out = {}
  path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          out[int(row.pop("step"))] = row
  return out


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (default: this run's, `jax.devices()`)."""
  axes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp}
  if config.mesh.get("tensor", 1) != 1:
    axes["tensor"] = config.mesh.tensor
  devices = list(jax.devices() if devices is None else devices)
  n = int(config.mesh.get("num_devices", 0))
  return parallel.make_mesh(axes, devices=devices[:n] if n else devices)


def make_checkpointer(workdir: str, config) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(layout.checkpoints_dir(workdir),
                                     max_to_keep=config.checkpoint.keep,
                                     save_every=config.checkpoint.every,
                                     async_save=config.checkpoint.async_save)


def resume(checkpointer: checkpoint_lib.Checkpointer, state: Any, loader: Any,
           workdir: str) -> tuple[Any, int]:
  """(state, start step): the newest readable checkpoint restored onto `state`'s shardings (the
  data iterator too), or `state` and 0 when the workdir has no checkpoint yet.

  An unreadable newest checkpoint is reported and the previous one used (see
  `Checkpointer.restore_newest`); CheckpointRestoreError when none can be read.
  """
  if checkpointer.latest_step() is None:
    return state, 0
  state, extra, step = checkpointer.restore_newest(target_state=state)
  if extra and extra.get("data") is not None and hasattr(loader, "set_state"):
    loader.set_state(extra["data"])
  log.info("Resumed %s at step %d (checkpoint %d).", workdir, int(state.step), step)
  return state, int(state.step)


def run_loop(*, workdir: str, config, state: Any, start_step: int,
             train_step: Callable[[Any, Any], tuple[Any, dict]],
             next_batch: Callable[[], Any], loader: Any,
             checkpointer: checkpoint_lib.Checkpointer,
             on_sample: Callable[[Any, int], None] | None = None,
             on_eval: Callable[[Any, int], dict] | None = None) -> tuple[Any, dict]:
  """The host loop: step, log one step late, checkpoint, sample, evaluate, stop on preemption.

  on_sample(state, step, check) -> uint8 grid or None, every config.log.sample_every steps.
  on_eval(state, step, check) -> scalars, every config.eval.every_steps: logged with that step's
  metrics.
  Both receive `check`, which raises `preemption.Interrupted` once a preemption signal arrived: they
  call it between their batches, so SIGTERM during a long phase abandons the phase, saves the
  step and returns within about one batch instead of after the whole phase.
  Returns the final state and the last metrics (as Python floats).
  """
  total = int(config.train.num_steps)
  eval_every = int(config.eval.every_steps) if "eval" in config else 0
  eval_results: dict[int, dict] = {}  # step -> scalars, until that step's metrics are flushed
  writer = MetricWriter(workdir, total, start_step)
  pending: tuple[int, dict] | None = None
  last: dict = {}
  steps_done, t0 = 0, time.time()

  def flush(pending_item):
    step, metrics = pending_item
    metrics = jax.device_get(metrics)
    if "nonfinite" in metrics and config.train.nonfinite == "stop":
      step_lib.check_finite(metrics, step)
    evaluated = eval_results.pop(step, None)
    if evaluated:
      metrics = dict(metrics, **evaluated)
    if step % config.log.every == 0 or step == total or evaluated:
      elapsed = max(time.time() - t0, 1e-9)
      metrics = dict(metrics, steps_per_sec=steps_done / elapsed,
                     examples_per_sec=steps_done * config.data.batch_size / elapsed)
      writer.scalars(step, metrics)
    return {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}

  def save(step, state, force=False):
    if not force and step % checkpointer.save_every:
      return  # Not a save step (checked here too: gathering the data states is collective).
    extra = {"data": gather_host_states(loader.get_state())
             if hasattr(loader, "get_state") else None,
             "config": json.loads(config.to_json_best_effort())}
    checkpointer.save(step, state, extra_json=extra, force=force)

  with preemption.PreemptionGuard() as guard:
    step = start_step
    try:
      while step < total:
        batch = next_batch()
        state, metrics = train_step(state, batch)
        step += 1
        steps_done += 1
        if pending is not None:
          last = flush(pending)
        pending = (step, metrics)
        writer.advance()
        save(step, state)
        try:
          if on_sample and config.log.sample_every and step % config.log.sample_every == 0:
            guard.check()
            grid = on_sample(state, step, guard.check)  # uint8 [H, W, 3] or None
            if grid is not None:
              writer.image(step, "samples", grid)
          if on_eval and eval_every and step % eval_every == 0:
            guard.check()
            eval_results[step] = on_eval(state, step, guard.check)
        except preemption.Interrupted:
          log.warning("Preemption signal received during sampling or evaluation: abandoning it, "
                      "saving step %d and exiting.", step)
          save(step, state, force=True)
          break
        if guard.should_stop(step):
          log.warning("Preemption signal received: saving step %d and exiting.", step)
          save(step, state, force=True)
          break
      if pending is not None:
        last = flush(pending)
      save(step, state, force=True)
    finally:
      checkpointer.wait()
      writer.close()
  return state, dict(last, step=step)


def gather_host_states(state: Any) -> Any:
  """Every host's data-iterator state, for the checkpoint (which only process 0's JSON reaches).

  One process: the state itself. Several: {"processes": [state of process 0, 1, ...]}, from which
  `inputs.Pipeline.set_state` picks its own. Collective: all processes must call it.
  """
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)  # [n]
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)  # [P]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded))  # [P, max n]
  return {"processes": [json.loads(every[i, :n].tobytes()) for i, n in enumerate(sizes)]}

