"""The training skeleton (`trainer.train`) with a toy task: what it guarantees to every stage.

A one-parameter-tree task on 8 px shapes keeps each run to a second or two: the skeleton writes
the workdir's files, compiles the step once before step 1 and logs its memory, checkpoints, and
resumes from the newest readable checkpoint (the one before when the newest is unreadable), telling
the task where it resumed.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import shapes_autoencoder
from ldm_jax import parallel
from ldm_jax.kernels import platform
from ldm_jax.train import loop
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib
from ldm_jax.train import trainer


def _config(num_steps: int):
  c = shapes_autoencoder.get_config("tiny")
  c.data.image_size = 8
  c.data.batch_size = 2
  c.mesh.num_devices = 1
  c.train.num_steps = num_steps
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  return c


class ToyTask(trainer.Task):
  """Fits a per-channel colour to the images: a loss, a state and batches, nothing else."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.calls = []

  def build(self, mesh, first_batch):
    self.calls.append(("build", first_batch["image"].shape))
    self.optimizer = optax.sgd(0.1)

  def init_state(self):
    def init_fn(rng):
      return state_lib.create_train_state({"colour": jnp.zeros((3,))}, self.optimizer, rng,
                                          use_ema=False)
    return init_fn, (jax.random.PRNGKey(0),)

  def after_resume(self, start_step):
    self.calls.append(("after_resume", start_step))

  def make_step(self, mesh, state_shardings):
    def loss_fn(params, batch, rng):
      del rng
      return jnp.mean(jnp.square(batch["image"] - params["colour"])), {}
    self.calls.append(("make_step",))
    return step_lib.make_train_step(loss_fn, self.optimizer, ema_decay=None, mesh=mesh,
                                    state_shardings=state_shardings), ()

  def batches(self, pipeline, mesh, start_step):
    self.calls.append(("batches", start_step))
    return lambda: parallel.make_global_batch(
        {"image": np.asarray(pipeline.next()["image"], np.float32)}, mesh)


class MeshRecordingTask(ToyTask):
  """ToyTask whose loss records the mesh context it is traced in."""

  def make_step(self, mesh, state_shardings):
    def loss_fn(params, batch, rng):
      del rng
      self.calls.append(("traced under", dict(jax.sharding.get_abstract_mesh().shape)))
      return jnp.mean(jnp.square(batch["image"] - params["colour"])), {}
    return step_lib.make_train_step(loss_fn, self.optimizer, ema_decay=None, mesh=mesh,
                                    state_shardings=state_shardings), ()


def _compile_lines(caplog):
  return [r for r in caplog.records if "Train step compiled" in r.getMessage()]


def test_skeleton_runs_a_task_and_resumes_it(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  caplog.set_level(logging.INFO, logger="ldm_jax.train")
  task = ToyTask(_config(4), workdir)
  last = trainer.train(task)
  assert task.calls == [("build", (2, 8, 8, 3)), ("after_resume", 0), ("make_step",),
                        ("batches", 0)]
  assert last["step"] == 4 and np.isfinite(last["loss"])
  # Compiled once, before step 1, with XLA's memory figures.
  lines = _compile_lines(caplog)
  assert len(lines) == 1 and "per-device memory (MiB): argument" in lines[0].getMessage()
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 4
  assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 4
  assert sorted(loop.read_metrics(workdir)) == [1, 2, 3, 4]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [2, 4]

  # The newest checkpoint unreadable: the run resumes at step 2 and trains to the new num_steps.
  state_dir = os.path.join(ckpt_dir, "4", "state")
  for name in os.listdir(state_dir):
    path = os.path.join(state_dir, name)
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  task = ToyTask(_config(6), workdir)
  last = trainer.train(task)
  assert ("after_resume", 2) in task.calls and ("batches", 2) in task.calls
  assert last["step"] == 6
  assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 6


def test_every_stage_validate_accepts_has_a_trainer():
  from ldm_jax import validate
  from ldm_jax.cli import train as entry
  assert set(entry.TRAINERS) == set(validate.STAGES)
  assert all(callable(m.train) for m in entry.TRAINERS.values())


def test_step_is_traced_under_the_training_mesh(tmp_path, monkeypatch):
  """On TPU the step's attention runs the Pallas kernel only when traced under the mesh
  (`platform.mesh_context`, which sets it for TPU meshes only; tests/kernels/test_mesh_context.py).
  Here a CPU mesh gets the same context: the loss is traced under the 2 devices' mesh."""
  monkeypatch.setattr(platform, "mesh_context",
                      lambda mesh: jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
  config = _config(2)
  config.mesh.num_devices = 2
  task = MeshRecordingTask(config, str(tmp_path / "run"))
  trainer.train(task)
  traced = [shape for call, *shape in task.calls if call == "traced under"]
  assert traced and all(shape == [{"data": 2, "fsdp": 1}] for shape in traced), traced
