"""Stage 1 training: a KL or VQ autoencoder with L1 + LPIPS + PatchGAN, as the paper trains them.

One jitted step updates both players, as CompVis's two optimizer_idx passes do:
1. generator: the reconstruction objective (L1 + perceptual, through a learned log-variance, plus the
   KL or codebook term) and the adversarial term weighted by the adaptive weight
   ||grad nll|| / ||grad g|| at the decoder's last layer. The gradients of both parts come from one
   forward pass and two backward passes (a VJP with two cotangents), so the ratio costs no extra
   forward.
2. discriminator: hinge (or vanilla) loss on real images and the (detached) reconstructions, switched
   on at `disc_start` like the generator's adversarial term.
Both optimizers accumulate `train.grad_accum_steps` micro-batches per update, as stage 2's does, and
a non-finite loss or gradient leaves every buffer as it was (step.py's guard).

`AutoencoderTask` is this stage's task for the training skeleton (`trainer.train`); the functions
it uses are shared with ahead-of-time compilation (ldm_jax.aot) and the benchmarks.
"""

import json
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import model_io
from ldm_jax import parallel
from ldm_jax import workdir_layout as layout
from ldm_jax.models import build
from ldm_jax.models import discriminator as disc_lib
from ldm_jax.models import lpips as lpips_lib
from ldm_jax.train import ae_losses
from ldm_jax.train import optim
from ldm_jax.train import step as step_lib
from ldm_jax.train import trainer

log = logging.getLogger("ldm_jax.train")


@flax.struct.dataclass
class AEState:
  step: jax.Array
  params: Any            # {'autoencoder': ..., 'logvar'?: scalar with loss.learn_logvar}
  opt_state: Any
  disc_vars: Any         # {'params': ..., 'batch_stats'?: ...}
  disc_opt_state: Any
  rng: jax.Array


def load_lpips(config):
  """LPIPS params from config.loss.lpips_path, or None when the config allows training without."""
  path = config.loss.lpips_path
  if path:
    from ldm_jax.convert import lpips as lpips_convert
    return lpips_convert.load_lpips_params(path)
  if config.loss.perceptual_weight and not config.loss.allow_no_lpips:
    raise FileNotFoundError(
        "config.loss.lpips_path is empty: the perceptual loss needs LPIPS weights. Make them with "
        "`python -m ldm_jax.convert.lpips --vgg VGG16.pth --lin vgg.pth --out lpips_vgg.npz`, or set "
        "--config.loss.allow_no_lpips=True to train with L1 + GAN + KL only.")
  log.warning("No LPIPS weights (config.loss.lpips_path is empty): training WITHOUT the perceptual "
              "loss, as config.loss.allow_no_lpips allows.")
  return None


def make_discriminator(config):
  return disc_lib.NLayerDiscriminator(input_nc=3, ndf=config.loss.disc_ndf,
                                      n_layers=config.loss.disc_num_layers,
                                      use_actnorm=config.loss.disc_use_actnorm)


def make_step(ae, disc, config, opt_g, opt_d, use_lpips: bool):
  """The pure step `(state, batch, lpips_params) -> (state, metrics)`."""
  loss_cfg = config.loss
  kind = loss_cfg.kind
  lpips_model = lpips_lib.LPIPS()
  losses = ae_losses.make_autoencoder_losses(
      kind, disc_start=loss_cfg.disc_start, kl_weight=loss_cfg.kl_weight,
      codebook_weight=loss_cfg.codebook_weight, disc_weight=loss_cfg.disc_weight,
      disc_factor=loss_cfg.disc_factor,
      perceptual_weight=loss_cfg.perceptual_weight if use_lpips else 0.0,
      disc_loss=loss_cfg.disc_loss)
  last_path = ("autoencoder",) + tuple(ae.decoder_last_layer_path)
  # disc_factor 0 switches the GAN off for the whole run (not just before disc_start): the step
  # then neither runs nor updates the discriminator.
  gan = loss_cfg.disc_factor > 0
  accum = int(config.train.grad_accum_steps)

  def apply_disc(disc_vars, images):
    """Train-mode logits (BatchNorm uses batch statistics, as in CompVis) and new batch_stats."""
    if "batch_stats" in disc_vars:
      return disc.apply(disc_vars, images, train=True, mutable=["batch_stats"])
    return disc.apply(disc_vars, images, train=True), {}

  def step(state: AEState, batch, lpips_params):
    x = batch["image"].astype(jnp.float32)  # [B, H, W, 3]
    rng, r_sample, r_drop = jax.random.split(state.rng, 3)
    # CompVis's global_step (disc_start's clock) counts optimizer updates, not micro-batches.
    global_step = step_lib.optimizer_updates(state.step, accum)
    perceptual = None
    if use_lpips:
      perceptual = lambda a, b: lpips_model.apply({"params": lpips_params}, a, b)  # [B]

    def generator_loss(params):
      rngs = {"sample": r_sample, "dropout": r_drop}
      variables = {"params": params["autoencoder"]}
      if kind == "kl":
        posterior = ae.apply(variables, x, deterministic=False, rngs=rngs, method=ae.encode)
        z, extra = posterior.sample(r_sample), {"kl": posterior.kl()}
      else:
        h = ae.apply(variables, x, deterministic=False, rngs=rngs, method=ae.encode)
        z, codebook_loss, _ = ae.apply(variables, h, method=ae.quantize)
        extra = {"codebook_loss": codebook_loss}

      def reconstruct(last_kernel):
        p = ae_losses.replace_leaf(params, last_path, last_kernel)
        decode_kw = {"force_not_quantize": True} if kind == "vq" else {}
        return ae.apply({"params": p["autoencoder"]}, z, deterministic=False, rngs=rngs,
                        method=ae.decode, **decode_kw)  # [B, H, W, 3]

      if gan:
        discriminator = lambda images: apply_disc(state.disc_vars, images)[0]
      else:  # No adversarial term at all: XLA drops the discriminator from the step.
        discriminator = lambda images: jnp.zeros((images.shape[0], 1, 1, 1), jnp.float32)
      if "logvar" in params:  # loss.learn_logvar: the nll's log-variance is trained too.
        extra["logvar"] = params["logvar"]
      loss, metrics = losses.generator(
          x, reconstruct, ae_losses.get_leaf(params, last_path), discriminator=discriminator,
          global_step=global_step, perceptual=perceptual, **extra)
      return loss, (metrics, reconstruct(ae_losses.get_leaf(params, last_path)))

    (g_total, (g_metrics, recon)), grads = jax.value_and_grad(
        generator_loss, has_aux=True)(state.params)
    params, opt_state = step_lib.apply_gradients(opt_g, grads, state.opt_state, state.params)

    fake = jax.lax.stop_gradient(recon)

    def discriminator_loss(disc_params):
      variables = dict(state.disc_vars, params=disc_params)
      logits_real, new_vars = apply_disc(variables, x)
      variables = dict(variables, **new_vars)
      logits_fake, new_vars = apply_disc(variables, fake)
      loss, metrics = losses.discriminator(logits_real, logits_fake, global_step=global_step)
      return loss, (new_vars, metrics)

    if gan:
      (d_total, (new_vars, d_metrics)), d_grads = jax.value_and_grad(
          discriminator_loss, has_aux=True)(state.disc_vars["params"])
      disc_params, disc_opt_state = step_lib.apply_gradients(
          opt_d, d_grads, state.disc_opt_state, state.disc_vars["params"])
      disc_vars = dict(state.disc_vars, **new_vars, params=disc_params)
    else:
      d_total, d_metrics = jnp.zeros((), jnp.float32), {}
      disc_vars, disc_opt_state = state.disc_vars, state.disc_opt_state

    metrics = dict(g_metrics, **d_metrics, loss=g_total, psnr=psnr(x, fake),
                   grad_norm=optax.global_norm(grads))
    finite = jnp.isfinite(g_total) & jnp.isfinite(d_total) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = (~finite).astype(jnp.int32)
    keep = lambda new, old: step_lib.keep_if_finite(finite, new, old)
    new_state = AEState(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        disc_vars=keep(disc_vars, state.disc_vars),
                        disc_opt_state=keep(disc_opt_state, state.disc_opt_state), rng=rng)
    return new_state, metrics

  return step


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean PSNR (dB) of images in [-1, 1], computed on the [0, 1] scale."""
  mse = jnp.mean(jnp.square((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) / 2.0), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def init_state(ae, disc, opt_g, opt_d, first_images, rng, learn_logvar=False) -> AEState:
  """Fresh state. The discriminator initialises on real images: ActNorm's data-dependent init
  (and nothing else) depends on them. CompVis never optimises the loss's logvar (it is not in the
  autoencoder optimiser's parameter list), so it stays 0 unless learn_logvar adds it to the state."""
  r_ae, r_disc, r_state = jax.random.split(rng, 3)
  x = jnp.asarray(first_images, jnp.float32)
  ae_vars = ae.init({"params": r_ae, "sample": r_ae}, x[:1])
  params = {"autoencoder": ae_vars["params"]}
  if learn_logvar:
    params["logvar"] = jnp.zeros((), jnp.float32)
  disc_vars = dict(disc.init(r_disc, x, train=False))
  return AEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_g.init(params),
                 disc_vars=disc_vars, disc_opt_state=opt_d.init(disc_vars["params"]),
                 rng=r_state)


# The optimizers and the jitted step, shared with ahead-of-time compilation (ldm_jax.aot).
def make_optimizers(config):
  """(generator optimizer, discriminator optimizer): CompVis's lr scaled by the effective batch
  (batch x accumulation), each accumulating `train.grad_accum_steps` micro-batches per update.
  A warm-up or decaying `train.schedule` runs over the optimizer updates; the default (constant,
  no warm-up) is CompVis's plain Adam."""
  accum = config.train.grad_accum_steps
  lr = optim.scale_lr_by_batch(config.loss.base_learning_rate, config.data.batch_size, accum)
  if config.train.schedule != "constant" or config.train.warmup_steps:
    lr = optim.learning_rate_fn(learning_rate=lr, warmup_steps=config.train.warmup_steps,
                                schedule=config.train.schedule,
                                total_steps=config.train.num_steps // accum)
  return (optim.make_gan_optimizer(learning_rate=lr, grad_accum_steps=accum),
          optim.make_gan_optimizer(learning_rate=lr, grad_accum_steps=accum))


def jit_step(step_fn, mesh, state_shardings):
  """`make_step`'s step jitted: state donated, batch split over the mesh, LPIPS replicated."""
  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


class AutoencoderTask(trainer.Task):
  """Stage 1 for the training skeleton: the autoencoder and its discriminator, one step for both."""

  def build(self, mesh, first_batch):
    config = self.config
    self.ae = build.build_first_stage(config.model.first_stage, config.train.compute_dtype)
    self.disc = make_discriminator(config)
    self.lpips_params = load_lpips(config)
    self.opt_g, self.opt_d = make_optimizers(config)
    # ActNorm initialises on real images: this host's first batch.
    self.first_images = np.asarray(first_batch["image"], np.float32)

  def init_state(self):
    def init_fn(rng):
      return init_state(self.ae, self.disc, self.opt_g, self.opt_d, self.first_images, rng,
                        learn_logvar=self.config.loss.learn_logvar)
    return init_fn, (jax.random.PRNGKey(self.config.seed),)

  def after_resume(self, start_step):
    save_first_stage_config(self.workdir, self.config)

  def make_step(self, mesh, state_shardings):
    use_lpips = self.lpips_params is not None and self.config.loss.perceptual_weight > 0
    step_fn = make_step(self.ae, self.disc, self.config, self.opt_g, self.opt_d, use_lpips)
    lpips_params = (jax.device_put(self.lpips_params, parallel.replicated(mesh)) if use_lpips
                    else None)
    return jit_step(step_fn, mesh, state_shardings), (lpips_params,)

  def batches(self, pipeline, mesh, start_step):
    def next_batch():
      host = pipeline.next()
      return parallel.make_global_batch({"image": np.asarray(host["image"], np.float32)}, mesh)
    return next_batch


def train(config, workdir: str) -> dict:
  """Trains the first stage in `workdir` (see `trainer.train`); returns the last metrics."""
  return trainer.train(AutoencoderTask(config, workdir))


FIRST_STAGE_FILE = layout.FIRST_STAGE_FILE


def save_first_stage_config(workdir: str, config) -> None:
  """Writes `first_stage.json` once (atomically); a resumed run keeps the file the checkpoints
  were made with, since stage 2 and the evaluators may be reading it at any time."""
  if not parallel.is_main_process():
    return
  path = os.path.join(workdir, FIRST_STAGE_FILE)
  text = config.model.first_stage.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        same = json.load(f) == json.loads(text)
    except ValueError:  # Unreadable (written by an older, non-atomic writer?): write it anew.
      same = None
    if same is not None:
      if not same:
        log.warning("%s differs from config.model.first_stage; keeping the file the checkpoints "
                    "were written with.", path)
      return
  model_io.write_text_atomic(path, text)


def load_autoencoder(path: str, first_stage_config=None) -> dict[str, Any]:
  """The first-stage variables {'params': ...} of an autoencoder workdir (its newest complete
  checkpoint) or a saved model. Read-only: safe while a trainer is saving into `path`."""
  del first_stage_config  # The caller checks the shapes against its own config.
  return model_io.load_first_stage(path)[1]


# Stage 1's config beside its checkpoints (model_io owns the workdir reader).
read_first_stage_config = model_io.read_first_stage_config
