"""Training the noisy-latent classifier of classifier guidance, as a task of the training skeleton.

    train(config, workdir)      # config.stage == 'classifier'

The recipe of CompVis's `NoisyLatentImageClassifier` (ldm/models/diffusion/classifier.py):
1. The frozen diffusion model named by `config.diffusion_checkpoint` (a saved model, a stage-2
   workdir or an imported checkpoint) supplies what the classifier must agree with at sampling
   time: its first stage and latent scale (images -> z0, outside the step), and its noise schedule.
2. Each example gets its own t drawn uniformly from [0, T) (CompVis: `torch.randint(0,
   num_timesteps)`), z0 is noised by q_sample, and the `EncoderUNet` sees (z_t, t).
3. Cross-entropy on the labels, averaged over the batch; accuracy (top-1) is logged beside it.
   CompVis uses no label smoothing and AdamW with weight_decay 1e-2 (its default); the configs say
   so, and `train.label_smoothing` is there for experiments.

The workdir holds the usual `config.json` and Orbax checkpoints, plus `classifier.json` (the
network's kwargs and the latent space it was trained on), which `ldm_jax.sampling` reads to guide
a model and to refuse one whose latents, classes or schedule differ.
"""

import json
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax import model_io
from ldm_jax import parallel
from ldm_jax import sampling
from ldm_jax import workdir_layout as layout
from ldm_jax.diffusion import objectives
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.errors import ConfigError
from ldm_jax.models import classifier as classifier_lib
from ldm_jax.train import ldm_trainer
from ldm_jax.train import step as step_lib
from ldm_jax.train import trainer

log = logging.getLogger("ldm_jax.train")

Logits = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, z_t, t) -> [B, K]


# ------------------------------------------------------------------------------------------------
# The objective: pure functions, tested against a closed form.
# ------------------------------------------------------------------------------------------------
def draw_t_and_noise(rng: jax.Array, shape: tuple[int, ...], num_timesteps: int
                     ) -> tuple[jax.Array, jax.Array]:
  """t [B] int32 uniform in [0, T) and standard normal noise of `shape` [B, H, W, C]."""
  r_t, r_noise = jax.random.split(rng)
  t = jax.random.randint(r_t, (shape[0],), 0, num_timesteps, dtype=jnp.int32)
  return t, jax.random.normal(r_noise, shape, jnp.float32)


def noisy_classifier_loss(logits_fn: Logits, params: Any, z0: jax.Array, labels: jax.Array,
                          t: jax.Array, noise: jax.Array, schedule: Schedule, *,
                          label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """Mean cross-entropy of logits_fn(params, q_sample(z0, t, noise), t) against labels.

  z0, noise: [B, H, W, C]; labels, t: [B] ints. With label_smoothing e the target is
  (1 - e) one_hot + e / K. Returns (loss, {'accuracy': top-1 fraction}), float32.
  """
  z_t = objectives.q_sample(schedule, z0, t, noise)  # [B, H, W, C]
  logits = logits_fn(params, z_t, t).astype(jnp.float32)  # [B, K]
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)  # [B, K]
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [B]
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return jnp.mean(ce), {"accuracy": accuracy}


def make_loss_fn(classifier: classifier_lib.EncoderUNet, schedule: Schedule, config):
  """loss_fn(params, batch {'z', 'label'}, rng) for `step.make_train_step`."""
  smoothing = float(config.train.get("label_smoothing", 0.0))

  def loss_fn(params, batch, rng):
    r_draw, r_drop = jax.random.split(rng)
    z0 = batch["z"].astype(jnp.float32)
    t, noise = draw_t_and_noise(r_draw, z0.shape, schedule.num_timesteps)

    def logits_fn(p, z_t, t_):
      return classifier.apply({"params": p}, z_t, t_, deterministic=False,
                              rngs={"dropout": r_drop})

    return noisy_classifier_loss(logits_fn, params, z0, batch["label"], t, noise, schedule,
                                 label_smoothing=smoothing)

  return loss_fn


# ------------------------------------------------------------------------------------------------
# The classifier and the latent space it lives in.
# ------------------------------------------------------------------------------------------------
def check_diffusion_model(config, model: ldm_lib.LatentDiffusion) -> None:
  """The diffusion checkpoint has the latent space the config describes (first stage, latent
  size and channels, schedule); ConfigError naming the first field that differs."""
  where = f"config.diffusion_checkpoint={config.diffusion_checkpoint}"
  canonical = lambda section: json.loads(json.dumps(section.to_dict(), sort_keys=True))
  if canonical(model.config.first_stage) != canonical(config.model.first_stage):
    raise ConfigError(f"{where}: its first stage differs from config.model.first_stage (the "
                      f"classifier reads the latents of the autoencoder the config names).")
  d, want = model.config.diffusion, config.model.diffusion
  for field in ("image_size", "channels") + sampling.SCHEDULE_FIELDS:
    if d[field] != want[field]:
      raise ConfigError(f"{where}: its diffusion.{field} is {d[field]!r}; "
                        f"config.model.diffusion.{field}={want[field]!r}.")


def classifier_kwargs(config) -> dict:
  """EncoderUNet kwargs of `config.model.classifier` (sequences as tuples)."""
  kwargs = config.model.classifier.to_dict()
  for key in ("attention_resolutions", "channel_mult"):
    kwargs[key] = tuple(kwargs[key])
  return kwargs


def latent_space(model: ldm_lib.LatentDiffusion) -> dict:
  """What a noisy-latent classifier shares with its diffusion model (classifier.json)."""
  d = model.config.diffusion
  return {"channels": model.latent_channels, "image_size": int(d.image_size),
          "scale_factor": float(model.scale_factor),
          "schedule": {k: d[k] for k in sampling.SCHEDULE_FIELDS}}


def write_classifier_file(workdir: str, kwargs: dict, model: ldm_lib.LatentDiffusion,
                          source: str) -> None:
  """`classifier.json`: the network (EncoderUNet kwargs) and the latent space of its training."""
  if not parallel.is_main_process():
    return
  text = json.dumps({"kwargs": kwargs, "latent": latent_space(model), "diffusion_model": source},
                    indent=2, sort_keys=True)
  model_io.write_text_atomic(layout.classifier_path(workdir), text)


def make_classifier(config) -> classifier_lib.EncoderUNet:
  """The `EncoderUNet` of config.model.classifier, computing in config.train.compute_dtype."""
  return classifier_lib.EncoderUNet(**classifier_kwargs(config),
                                    dtype=jnp.dtype(config.train.compute_dtype))


def init_state_fn(config, classifier: classifier_lib.EncoderUNet, optimizer):
  """init(rng) -> the fresh TrainState of `classifier` on the latents config.model.diffusion
  describes (image_size x image_size x channels)."""
  d = config.model.diffusion
  x = jnp.zeros((1, int(d.image_size), int(d.image_size), int(d.channels)), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  init_state = ldm_trainer.init_state_fn(config, optimizer)

  def init(rng):
    r_params, r_state = jax.random.split(rng)
    return init_state(classifier.init(r_params, x, t)["params"], r_state)
  return init


def make_step(config, classifier: classifier_lib.EncoderUNet, schedule: Schedule, optimizer,
              lr_fn, mesh, state_shardings):
  """The jitted, donating `(state, {'z', 'label'}) -> (state, metrics)`."""
  return step_lib.make_config_step(make_loss_fn(classifier, schedule, config), config, optimizer,
                                   lr_fn, mesh, state_shardings)


# ------------------------------------------------------------------------------------------------
# The task.
# ------------------------------------------------------------------------------------------------
class ClassifierTask(trainer.Task):
  """The noisy-latent classifier for the training skeleton: frozen LDM latents, CE on labels."""

  def build(self, mesh, first_batch):
    config = self.config
    if "label" not in first_batch:
      raise ConfigError(f"config.data.label_key={config.data.label_key!r}: the batches carry no "
                        f"'label' (keys: {sorted(first_batch)}); the classifier trains on labels.")
    if not config.diffusion_checkpoint:
      raise ConfigError("config.diffusion_checkpoint is empty: the classifier trains on the "
                        "latents and the noise schedule of a diffusion model (a saved model or a "
                        "stage-2 workdir).")
    self.model = ldm_lib.LatentDiffusion.from_checkpoint(config.diffusion_checkpoint)
    check_diffusion_model(config, self.model)
    # Of the diffusion model the task uses its first stage (encoding each batch), latent scale
    # and schedule: its UNet and condition encoder are not kept on the devices.
    self.model.params = {"first_stage": self.model.params["first_stage"]}
    self.kwargs = classifier_kwargs(config)
    self.classifier = make_classifier(config)
    self.optimizer, self.lr_fn = ldm_trainer.make_optimizer(config)

  def init_state(self):
    # The checkpoint's latent size and channels are the config's (check_diffusion_model).
    return (init_state_fn(self.config, self.classifier, self.optimizer),
            (jax.random.PRNGKey(self.config.seed),))

  def after_resume(self, start_step):
    write_classifier_file(self.workdir, self.kwargs, self.model, self.config.diffusion_checkpoint)

  def make_step(self, mesh, state_shardings):
    return make_step(self.config, self.classifier, self.model.schedule, self.optimizer,
                     self.lr_fn, mesh, state_shardings), ()

  def batches(self, pipeline, mesh, start_step):
    # The encoder's key is a function of the step, so a resumed run encodes as an unbroken one.
    encode_rng, batch_step = jax.random.PRNGKey(self.config.seed + 2), start_step
    num_classes = self.kwargs["num_classes"]

    def next_batch():
      nonlocal batch_step
      sub = jax.random.fold_in(encode_rng, batch_step)
      batch_step += 1
      host = pipeline.next()
      labels = np.asarray(host["label"], np.int32)
      bad = labels[(labels < 0) | (labels >= num_classes)]
      if bad.size:
        raise ConfigError(f"config.data.label_key={self.config.data.label_key!r}: label "
                          f"{int(bad[0])} in the data; the classifier has num_classes="
                          f"{num_classes} (expected 0 <= label < {num_classes}).")
      arrays = parallel.make_global_batch(
          {"image": np.asarray(host["image"], np.float32), "label": labels}, mesh)
      return {"z": self.model.encode(arrays["image"], sub), "label": arrays["label"]}
    return next_batch


def train(config, workdir: str) -> dict:
  """Trains the noisy-latent classifier in `workdir` (see `trainer.train`); the last metrics."""
  return trainer.train(ClassifierTask(config, workdir))


def check_config(config) -> None:
  """ValueError naming the first impossible classifier field (`validate.check_config` calls it
  after the first stage's checks); the diffusion checkpoint itself is checked when training
  starts."""
  if not config.data.label_key:
    raise ValueError("config.data.label_key='': the classifier trains on labels; expected the "
                     "data's label field.")
  smoothing = float(config.train.get("label_smoothing", 0.0))
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"config.train.label_smoothing={smoothing!r}: expected in [0, 1).")
  kwargs = classifier_kwargs(config)
  try:
    classifier_lib.EncoderUNet(**kwargs).trunk_layout()
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model.classifier: {e}") from None
  fs, d = config.model.first_stage.kwargs, config.model.diffusion
  f = 2 ** (len(fs.ch_mult) - 1)
  if d.image_size != config.data.image_size // f:
    raise ValueError(f"config.model.diffusion.image_size={d.image_size}: the first stage makes "
                     f"{config.data.image_size // f} px latents of {config.data.image_size} px "
                     f"images.")
  if not kwargs["in_channels"] == d.channels == fs.embed_dim:
    raise ValueError(f"config.model.classifier.in_channels={kwargs['in_channels']}: expected the "
                     f"latent channels, model.first_stage.kwargs.embed_dim={fs.embed_dim} "
                     f"(= model.diffusion.channels).")
  if kwargs.get("pool") == "attention" and kwargs.get("image_size") != d.image_size:
    raise ValueError(f"config.model.classifier.image_size={kwargs['image_size']}: the attention "
                     f"head is built for the {d.image_size} px latents; expected "
                     f"{d.image_size}.")
