"""Stage 2 training: a latent diffusion model on the latents of a frozen first stage.

    train(config, workdir)

1. Model: resume `<workdir>/model` if it exists; else `config.init_from` (a saved model, workdir or
   imported checkpoint), else a fresh init whose first stage comes from `config.first_stage_checkpoint`.
   `scale_by_std` estimates the latent scale once from the first batch; the full model (first stage
   included) is then written to `<workdir>/model`, so the workdir alone can be sampled from.
2. State: trainable params (UNet, plus the jointly trained text transformer) born sharded on the mesh,
   with AdamW state and the EMA.
3. Loop (`trainer.train`, the skeleton both stages share): images -> latents outside the step
   (frozen), the pure step inside, checkpoints with the data iterator state, preemption-safe.

With `config.lora.rank` > 0 the model of `config.init_from` stays frozen and only LoRA adapters
train (ldm_jax/train/lora.py): no model/ is written, the state and checkpoints hold the adapters.

`LatentDiffusionTask` is this stage's task for the skeleton; the functions above it are shared
with ahead-of-time compilation (ldm_jax.aot).
"""

import logging
import os

import jax
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax import model_io
from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.train import ldm_task
from ldm_jax.train import lora as lora_lib
from ldm_jax.train import optim
from ldm_jax.train import samples as samples_lib
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib
from ldm_jax.train import trainer

log = logging.getLogger("ldm_jax.train")


def build_model(config, workdir: str, first_images: np.ndarray) -> ldm_lib.LatentDiffusion:
  """The model to train (see module docstring, step 1)."""
  model_dir = os.path.join(workdir, model_io.MODEL_SUBDIR)
  if os.path.isfile(layout.config_path(model_dir)):
    cfg, params = model_io.load_saved_model(model_dir)
    return ldm_lib.LatentDiffusion(cfg, params, compute_dtype=config.train.compute_dtype)
  rng = jax.random.PRNGKey(config.seed)
  if config.init_from:
    model = ldm_lib.LatentDiffusion.from_checkpoint(config.init_from,
                                                    compute_dtype=config.train.compute_dtype)
  else:
    model = ldm_lib.LatentDiffusion.init(config.model, rng,
                                         compute_dtype=config.train.compute_dtype)
    if not config.first_stage_checkpoint:
      raise ValueError("config.first_stage_checkpoint is empty: stage 2 needs a trained first stage "
                       "(an autoencoder workdir or saved model).")
    model.params["first_stage"] = load_first_stage(config.first_stage_checkpoint, model)
  if model.config.diffusion.scale_by_std and not config.init_from:  # Estimated once, when fresh.
    scale = ldm_task.estimate_scale_factor(model, first_images, jax.random.PRNGKey(1))
    log.info("scale_by_std: scale_factor = %.6f", scale)
    cfg = model.config
    cfg.diffusion.scale_factor = scale
    model = ldm_lib.LatentDiffusion(cfg, model.params, compute_dtype=config.train.compute_dtype)
  if parallel.is_main_process():
    # A crash between the parameters and config.json leaves params/ alone: this start re-derives
    # the same model (the seed, init_from or first stage, the first batch), so it writes it again.
    model_io.save_model(model_dir, model.config, model.params, replace_incomplete=True)
  return model


def load_first_stage(path: str, model: ldm_lib.LatentDiffusion):
  """First-stage variables from an autoencoder workdir/saved autoencoder, checked against config."""
  _, variables = model_io.load_first_stage(path)
  template = jax.eval_shape(lambda: model.params["first_stage"])
  got = jax.eval_shape(lambda: variables)
  if jax.tree_util.tree_structure(template) != jax.tree_util.tree_structure(got) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(got))):
    raise ValueError(f"config.first_stage_checkpoint={path}: its autoencoder does not match "
                     f"config.model.first_stage.")
  return variables


# ------------------------------------------------------------------------------------------------
# The step and its state, shared with ahead-of-time compilation (ldm_jax.aot), which builds them
# from abstract parameters.
# ------------------------------------------------------------------------------------------------
def make_optimizer(config):
  """(AdamW with the config's schedule, that schedule as a function of the update count).

  The schedule runs over optimizer updates: warmup_steps counts updates, and a decay ends at the
  run's last one, num_steps // grad_accum_steps (num_steps counts micro-batches).
  """
  lr = config.train.learning_rate
  accum = config.train.grad_accum_steps
  if config.train.scale_lr_by_batch:
    lr = optim.scale_lr_by_batch(lr, config.data.batch_size, accum)
  updates = config.train.num_steps // accum
  if config.train.schedule != "constant" and updates <= config.train.warmup_steps:
    raise ValueError(
        f"config.train.schedule={config.train.schedule!r} decays over the run's optimizer updates, "
        f"num_steps // grad_accum_steps = {config.train.num_steps} // {accum} = {updates}: "
        f"expected more than config.train.warmup_steps={config.train.warmup_steps}.")
  optimizer = optim.make_optimizer(
      learning_rate=lr, warmup_steps=config.train.warmup_steps, schedule=config.train.schedule,
      total_steps=updates, weight_decay=config.train.weight_decay,
      b1=config.train.b1, b2=config.train.b2,
      grad_clip_norm=config.train.grad_clip_norm or None,
      grad_accum_steps=accum)
  lr_fn = optim.learning_rate_fn(learning_rate=lr, warmup_steps=config.train.warmup_steps,
                                 schedule=config.train.schedule, total_steps=updates)
  return optimizer, lr_fn


def training_model(model: ldm_lib.LatentDiffusion, config) -> ldm_lib.LatentDiffusion:
  """The model as the step runs it: UNet blocks rematerialised when config.train.remat."""
  if not config.train.remat:
    return model
  cfg = model.config
  cfg.unet.remat = True
  return ldm_lib.LatentDiffusion(cfg, model.params, compute_dtype=config.train.compute_dtype,
                                 tokenizer=model._tokenizer)


def init_state_fn(config, optimizer):
  """init_state(trainable params, rng) -> the fresh TrainState (AdamW moments, EMA)."""
  def init_state(trainable, rng):
    return state_lib.create_train_state(trainable, optimizer, rng, use_ema=config.train.use_ema)
  return init_state


def make_step(model: ldm_lib.LatentDiffusion, config, optimizer, lr_fn, mesh, state_shardings):
  """The jitted, donating `(state, batch) -> (state, metrics)` over the latent diffusion loss."""
  return step_lib.make_config_step(ldm_task.make_loss_fn(model, config), config, optimizer, lr_fn,
                                   mesh, state_shardings)


class LatentDiffusionTask(trainer.Task):
  """Stage 2 for the training skeleton: the diffusion loss on frozen-first-stage latents."""

  lora: lora_lib.LoraTraining | None = None  # Set when config.lora trains adapters only.

  def build(self, mesh, first_batch):
    config, workdir = self.config, self.workdir
    if lora_lib.enabled(config):
      self.model = training_model(lora_lib.load_base(config, workdir), config)
      self.lora = lora_lib.LoraTraining(self.model, config, mesh)
    elif "image" not in first_batch and (
        config.model.diffusion.scale_by_std and not config.init_from and
        not os.path.isdir(os.path.join(workdir, model_io.MODEL_SUBDIR))):
      raise ValueError("config.data.source='latent_cache' with scale_by_std: the scale is "
                       "estimated from images; build the cache with the trained model and set "
                       "config.model.diffusion.scale_factor instead.")
    else:
      self.model = training_model(build_model(config, workdir, first_batch.get("image")), config)
    self.mesh = mesh  # The sample grid and the eval hook sample on the training mesh.
    self.optimizer, self.lr_fn = make_optimizer(config)
    if "eval" in config and config.eval.every_steps:
      from ldm_jax.train import eval_hook  # Local: only runs with config.eval need the metrics.
      self.run_eval = eval_hook.make_train_hook(config, workdir, mesh)
      self.evaluate = self._evaluate

  def init_state(self):
    if self.lora:
      return self.lora.init_state(self.optimizer)
    return init_state_fn(self.config, self.optimizer), (
        ldm_task.trainable_params(self.model, self.config),
        jax.random.PRNGKey(self.config.seed + 1))

  def make_step(self, mesh, state_shardings):
    if self.lora:
      return self.lora.make_step(mesh, state_shardings, self.optimizer, self.lr_fn)
    return make_step(self.model, self.config, self.optimizer, self.lr_fn, mesh,
                     state_shardings), ()

  def batches(self, pipeline, mesh, start_step):
    # The encoder's key is a function of the step, so a resumed run encodes as an unbroken one.
    encode_rng, batch_step = jax.random.PRNGKey(self.config.seed + 2), start_step

    def next_batch():
      nonlocal batch_step
      sub = jax.random.fold_in(encode_rng, batch_step)
      batch_step += 1
      return ldm_task.encode_batch(self.model, pipeline.next(), sub, self.config, mesh)
    return next_batch

  def _trained_model(self, state) -> ldm_lib.LatentDiffusion:
    """The model with the state's EMA weights (or its raw ones when the run keeps no EMA)."""
    trained = state.ema_params if state.ema_params is not None else state.params
    if self.lora:
      trained = self.lora.adapted_params(trained)
    return ldm_task.apply_trained(self.model, trained)

  def sample(self, state, step, check):
    del check  # One sampling call: the loop checks before it.
    return samples_lib.log_sample_grid(self._trained_model(state), self.config, self.workdir,
                                       step, self.mesh)

  def _evaluate(self, state, step, check):
    return self.run_eval(self._trained_model(state), step, check)


def train(config, workdir: str) -> dict:
  """Trains a latent diffusion model in `workdir` (see `trainer.train`); returns the last metrics."""
  return trainer.train(LatentDiffusionTask(config, workdir))
