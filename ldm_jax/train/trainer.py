"""The one training skeleton; each stage is a `Task` that it asks for models, state, step and batches.

    trainer.train(task) -> the last step's metrics

The skeleton owns what both stages do alike, so it is written once:
1. Setup: `config.json` in the workdir, the mesh, the input pipeline; the task builds its models from
   the first batch (without consuming it).
2. State: the task's fresh state born sharded on the mesh, then the newest readable checkpoint
   restored onto it (an unreadable newest one falls back to the one before; see `loop.resume`).
3. Step: the task's jitted step, compiled before step 1 with XLA's memory figures logged once.
4. Loop (`loop.run_loop`): metrics one step late, checkpoints with the data iterator state, samples
   and evaluations at their intervals, preemption saves and exits.
5. Publish: `summary.json` with the last metrics.

The caller starts the distributed runtime and holds the workdir lock before calling `train`
(`entry.train` does both: the runtime must start before config validation counts the devices).

A task (see `Task`) supplies the parts that differ, as VDM's Experiment asks its subclasses for the
model, the loss and the sampler: `build`, `init_state`, `make_step`, `batches`, and optionally
`after_resume`, `sample`, `evaluate`.
"""

import logging
from typing import Any, Callable

import jax

from ldm_jax import parallel
from ldm_jax.kernels import platform
from ldm_jax.train import inputs
from ldm_jax.train import loop
from ldm_jax.train import step as step_lib

log = logging.getLogger("ldm_jax.train")

# (state, step, check) -> a uint8 grid [H, W, 3] or None (sample), or {name: scalar} (evaluate).
Hook = Callable[[Any, int, Callable[[], None]], Any]


class Task:
  """One stage's parts of a training run; the skeleton calls them in this order.

  Subclasses set `self.config` and `self.workdir` (the constructor does) and implement the methods
  that raise NotImplementedError. `sample` and `evaluate` stay None when the stage has none.
  """

  sample: Hook | None = None
  evaluate: Hook | None = None

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir

  def build(self, mesh: jax.sharding.Mesh, first_batch: dict) -> None:
    """Models, losses and optimizers; `first_batch` is this host's first batch (peeked)."""
    raise NotImplementedError

  def init_state(self) -> tuple[Callable[..., Any], tuple]:
    """(init_fn, args): `init_fn(*args)` is the fresh train state, which the skeleton jits so
    that it is born sharded."""
    raise NotImplementedError

  def after_resume(self, start_step: int) -> None:
    """Called once the state is fresh or restored, before the step is built."""

  def make_step(self, mesh: jax.sharding.Mesh, state_shardings: Any
                ) -> tuple[Callable[..., tuple[Any, dict]], tuple]:
    """(jitted step, constants): the loop calls `step(state, batch, *constants)`; the step is a
    `jax.jit` function, so the skeleton can compile it ahead of step 1."""
    raise NotImplementedError

  def batches(self, pipeline: inputs.Pipeline, mesh: jax.sharding.Mesh,
              start_step: int) -> Callable[[], Any]:
    """next_batch() -> the step's global batch, for steps start_step + 1, start_step + 2, ..."""
    raise NotImplementedError


def train(task: Task) -> dict:
  """Runs `task` to config.train.num_steps (resuming its workdir) and returns the last metrics."""
  config, workdir = task.config, task.workdir

  # --- Setup. ---
  loop.write_config(workdir, config)
  mesh = loop.make_mesh(config)
  pipeline = inputs.make_pipeline(config, mesh=mesh)
  task.build(mesh, pipeline.peek())

  # --- State: born sharded, then resumed. ---
  init_fn, init_args = task.init_state()
  state = parallel.init_sharded(init_fn, *init_args, mesh=mesh,
                                min_size=config.mesh.min_shard_size)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  checkpointer = loop.make_checkpointer(workdir, config)
  state, start_step = loop.resume(checkpointer, state, pipeline, workdir)
  task.after_resume(start_step)

  # --- The step, compiled before step 1. ---
  jitted, constants = task.make_step(mesh, state_shardings)
  compiled = False

  def train_step(state, batch):
    nonlocal compiled
    # Traced in the mesh's kernel context (TPU attention needs it), the same at every call so
    # that jit's cache keeps hitting.
    with platform.mesh_context(mesh):
      if not compiled:  # The call below reuses this compilation (jit caches it).
        _, figures = step_lib.compile_step(jitted, state, batch, *constants)
        log_compiled(figures)
        compiled = True
      return jitted(state, batch, *constants)

  # --- The loop, then publish. ---
  state, last = loop.run_loop(workdir=workdir, config=config, state=state, start_step=start_step,
                              train_step=train_step,
                              next_batch=task.batches(pipeline, mesh, start_step),
                              loader=pipeline, checkpointer=checkpointer, on_sample=task.sample,
                              on_eval=task.evaluate)
  loop.write_summary(workdir, last)
  checkpointer.close()
  return last


def log_compiled(figures: dict[str, float]) -> None:
  """One line of the compiled step's per-device memory (MiB), as XLA's analysis reports it."""
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
           "alias_size_in_bytes", "generated_code_size_in_bytes")
  shown = [f"{n.replace('_size_in_bytes', '')} {figures[n] / 2**20:.1f}" for n in names
           if n in figures]
  if shown:
    log.info("Train step compiled; per-device memory (MiB): %s.", ", ".join(shown))
  else:
    log.info("Train step compiled; this backend reports no memory analysis.")
