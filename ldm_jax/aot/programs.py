"""The programs a config runs, built from abstract shapes and compiled for any devices.

    mesh = loop.make_mesh(config, devices)
    program = ldm_train_step(config, mesh)   # or ae_ / classifier_train_step, sample_loop
    compiled, seconds = compile_program(program)

Each program is the trainer's own function (`ldm_trainer.make_step`, `ae_trainer.make_step` +
`jit_step`, `classifier_task.make_step`, `diffusion.samplers.sample` behind
`sampling.UNetDenoiser`) lowered on `jax.ShapeDtypeStruct`s that carry the shardings a run would
give them (`parallel.abstract_sharded`): no parameter is ever allocated, so SD-size models compile
on a laptop.
"""

import contextlib
import copy
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm as ldm_lib
from ldm_jax import parallel
from ldm_jax import sampling
from ldm_jax.aot import report
from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.kernels import platform
from ldm_jax.models import conditioning
from ldm_jax.models import tokenizers as tokenizers_lib
from ldm_jax.train import ldm_task
from ldm_jax.train import ldm_trainer


@dataclasses.dataclass
class Program:
  """A function and the abstract arguments to lower it on.

  images: images one call processes (the global batch); state: the abstract train state whose
  per-chip parameter / optimizer / EMA bytes are reported (None for sampling, whose arguments
  are the UNet parameters and the conditioning); resident_bytes: what else a run keeps on each
  chip between calls (stage 2's frozen encoders, which encode each batch outside the step).
  """
  name: str
  fn: Callable[..., Any]
  args: tuple
  images: int
  state: Any = None
  resident_bytes: int = 0


class _ZeroTokens:
  """Stands in for a text model's tokenizer files: token ids do not change the compiled program."""

  def __call__(self, prompts, *, max_length, **unused):
    del unused
    n = len(prompts)
    return {"input_ids": np.zeros((n, max_length), np.int32),
            "attention_mask": np.ones((n, max_length), np.int32)}


def abstract_model(config) -> ldm_lib.LatentDiffusion:
  """The config's LatentDiffusion (config.model, as a fresh run builds it) with abstract params.

  init_from and first_stage_checkpoint are not read: they change parameter values, not shapes.
  """
  params = jax.eval_shape(lambda rng: ldm_lib.init_params(config.model, rng),
                          jax.random.PRNGKey(0))
  tokenizer = None
  tok = dict(config.model.get("cond_stage", {}) or {}).get("tokenizer", {}) or {}
  if tok.get("kind") and tok.get("kind") not in ldm_lib.WORD_TOKENIZERS:
    tokenizer = tokenizers_lib.TextTokenizer(kind=tok["kind"], hf=_ZeroTokens())
  return ldm_lib.LatentDiffusion(config.model, params, compute_dtype=config.train.compute_dtype,
                                 tokenizer=tokenizer)


def _with_params(model: ldm_lib.LatentDiffusion, params) -> ldm_lib.LatentDiffusion:
  """The same model over other (e.g. traced) parameters."""
  out = copy.copy(model)
  out.params = params
  return out


def _host_batch(model: ldm_lib.LatentDiffusion, config, n: int) -> dict[str, Any]:
  """A data-pipeline batch of n examples with every field the model's family reads."""
  size = int(config.data.image_size)
  batch: dict[str, Any] = {"image": np.zeros((n, size, size, 3), np.float32)}
  if model.is_text:
    batch["caption"] = [""] * n
  if model.cond_kind == "class":
    batch["label"] = np.zeros((n,), np.int32)
  # Layout and semantic maps read boxes: one box per image, the whole image.
  batch["boxes"] = np.tile(np.asarray([[[0.0, 0.0, 1.0, 1.0]]], np.float32), (n, 1, 1))
  batch["box_labels"] = np.zeros((n, 1), np.int32)
  return batch


def _nbytes(tree) -> int:
  """Bytes of a pytree of (abstract) arrays."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _place(tree, sharding) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def ldm_train_step(config, mesh) -> Program:
  """Stage 2's train step as `ldm_trainer.train` builds it, on abstract state and batch."""
  model = abstract_model(config)
  optimizer, lr_fn = ldm_trainer.make_optimizer(config)
  model = ldm_trainer.training_model(model, config)
  state = parallel.abstract_sharded(ldm_trainer.init_state_fn(config, optimizer),
                                    ldm_task.trainable_params(model, config),
                                    jax.random.PRNGKey(0), mesh=mesh,
                                    min_size=config.mesh.min_shard_size)
  step = ldm_trainer.make_step(model, config, optimizer, lr_fn, mesh,
                               jax.tree.map(lambda a: a.sharding, state))
  # The step's inputs are what `encode_batch` makes of a host batch (latents and conditioning);
  # their shapes come from tracing it, with the frozen encoders' parameters abstract too.
  n = int(config.data.batch_size)
  host = _host_batch(model, config, n)

  def encode(params):
    # Host-side work (the numpy rng from the key, tokenising) needs concrete values: only what
    # depends on the abstract parameters is traced.
    with jax.ensure_compile_time_eval():
      return ldm_task.encode_batch(_with_params(model, params), host, jax.random.PRNGKey(0),
                                   config)

  batch = jax.eval_shape(encode, model.params)
  frozen = {"first_stage": model.params["first_stage"]}
  if not ldm_task.trains_cond_stage(model, config):
    frozen["cond_stage"] = model.params["cond_stage"]
  return Program("train_step", step, (state, _place(batch, parallel.batch_sharding(mesh))),
                 images=n, state=state, resident_bytes=_nbytes(frozen))


def ae_train_step(config, mesh) -> Program:
  """Stage 1's generator + discriminator step as `ae_trainer.train` builds it."""
  from ldm_jax.models import build
  from ldm_jax.models import lpips as lpips_lib
  from ldm_jax.train import ae_trainer  # Local: stage 1 only.
  ae = build.build_first_stage(config.model.first_stage, config.train.compute_dtype)
  disc = ae_trainer.make_discriminator(config)
  opt_g, opt_d = ae_trainer.make_optimizers(config)
  n, size = int(config.data.batch_size), int(config.data.image_size)
  images = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
  # Compiled as a run with LPIPS weights would be, unless the config trains without them.
  use_lpips = config.loss.perceptual_weight > 0 and (bool(config.loss.lpips_path) or
                                                     not config.loss.allow_no_lpips)

  def init_fn(first_images, rng):
    return ae_trainer.init_state(ae, disc, opt_g, opt_d, first_images, rng,
                                 learn_logvar=config.loss.learn_logvar)

  state = parallel.abstract_sharded(init_fn, images, jax.random.PRNGKey(0), mesh=mesh,
                                    min_size=config.mesh.min_shard_size)
  step = ae_trainer.jit_step(ae_trainer.make_step(ae, disc, config, opt_g, opt_d, use_lpips),
                             mesh, jax.tree.map(lambda a: a.sharding, state))
  lpips_params = None
  if use_lpips:
    one = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    lpips_params = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.PRNGKey(0), one,
                                  one)["params"]
    lpips_params = _place(lpips_params, parallel.replicated(mesh))
  batch = {"image": jax.ShapeDtypeStruct(images.shape, images.dtype,
                                         sharding=parallel.batch_sharding(mesh))}
  return Program("train_step", step, (state, batch, lpips_params), images=n, state=state)


def classifier_train_step(config, mesh) -> Program:
  """The noisy-latent classifier's step as `classifier_task.train` builds it.

  Its batches are latents the frozen first stage encodes outside the step (resident on each
  chip); the schedule is config.model.diffusion's, which a run checks against its diffusion
  checkpoint.
  """
  from ldm_jax import networks
  from ldm_jax.train import classifier_task  # Local: the classifier stage only.
  classifier = classifier_task.make_classifier(config)
  optimizer, lr_fn = ldm_trainer.make_optimizer(config)
  state = parallel.abstract_sharded(
      classifier_task.init_state_fn(config, classifier, optimizer), jax.random.PRNGKey(0),
      mesh=mesh, min_size=config.mesh.min_shard_size)
  step = classifier_task.make_step(config, classifier, networks.noise_schedule(config.model),
                                   optimizer, lr_fn, mesh,
                                   jax.tree.map(lambda a: a.sharding, state))
  n, d = int(config.data.batch_size), config.model.diffusion
  batch = {"z": jax.ShapeDtypeStruct((n, int(d.image_size), int(d.image_size), int(d.channels)),
                                     jnp.float32),
           "label": jax.ShapeDtypeStruct((n,), jnp.int32)}
  first_stage = jax.eval_shape(lambda rng: networks.init_first_stage(config.model.first_stage, rng),
                               jax.random.PRNGKey(0))
  return Program("train_step", step, (state, _place(batch, parallel.batch_sharding(mesh))),
                 images=n, state=state, resident_bytes=_nbytes(first_stage))


def _sampling_inputs(model: ldm_lib.LatentDiffusion, n: int) -> dict[str, Any]:
  """`LatentDiffusion.condition` arguments for n samples of the model's family."""
  kind, f = model.cond_kind, model.downsample_factor
  h = int(model.config.diffusion.image_size)
  if model.is_text and ldm_task.is_layout(model):
    length = int(model.cond_stage_config.get("kwargs", {}).get("max_length", 77))
    return {"tokens": np.zeros((n, length), np.int32)}
  if model.is_text:
    inputs = {"prompts": [""] * n}
    pixels = h * f  # The image size the latents decode to.
    if model.is_text_inpainting:  # The masked image and its mask, at image size.
      inputs.update(images=np.zeros((n, pixels, pixels, 3), np.float32),
                    mask=np.ones((n, pixels, pixels, 1), np.float32))
    elif model.is_upscaler:  # The low-resolution image is the latent grid's size.
      inputs.update(images=np.zeros((n, h, h, 3), np.float32),
                    lowres_noise=np.zeros((n, h, h, 3), np.float32))
    elif model.is_depth:  # The depth map, already at latent size.
      inputs.update(depth=np.zeros((n, h, h, 1), np.float32))
    return inputs
  if kind == "class":
    return {"labels": [0] * n}
  if kind == "first_stage":
    return {"images": np.zeros((n, h * f, h * f, 3), np.float32),
            "mask": np.ones((n, h * f, h * f, 1), np.float32)}
  if kind == "spatial_rescaler":
    channels = int(model.cond_stage_config["kwargs"]["in_channels"])
    return {"images": np.zeros((n, h * f, h * f, channels), np.float32)}
  if conditioning.takes_concat(model.config.diffusion.conditioning_key):
    channels = int(model.config.unet.in_channels) - model.latent_channels
    return {"images": np.zeros((n, h, h, channels), np.float32)}
  return {}


def _sampling_setup(config, mesh, batch_per_chip: int, guidance: float):
  """(model, denoiser, abstract x_T, payload, n) as `sampling.sample` builds them for n samples,
  placed as `sampling.shard_batch` places them: batch split over the mesh's batch axes, UNet
  parameters replicated."""
  model = abstract_model(config)
  shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.shape]))
  n = batch_per_chip * shards
  guided = float(guidance) != 1.0 and (model.is_text or model.cond_kind == "class") and not (
      ldm_task.is_layout(model))
  inputs = _sampling_inputs(model, n)

  def conditioning(params):
    m = _with_params(model, params)
    cond = m.condition(**inputs)
    return (cond, m.unconditional(cond, n)) if guided else (cond, None)

  cond, uncond = jax.eval_shape(conditioning, model.params)
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  payload = {"params": _place(model.params["unet"], replicated),
             "cond": _place(cond, batch_sharding)}
  if guided:
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    payload.update(uncond=_place(uncond, batch_sharding), scale=scalar, rescale=scalar)
  h = int(model.config.diffusion.image_size)
  x_T = jax.ShapeDtypeStruct((n, h, h, model.latent_channels), jnp.float32,
                             sharding=batch_sharding)
  denoise = sampling.UNetDenoiser(model.unet, model.config.diffusion.conditioning_key, guided)
  return model, denoise, x_T, payload, n


def sample_loop(config, mesh, *, batch_per_chip: int, steps: int = 50, guidance: float = 7.5,
                sampler: str = "ddim") -> Program:
  """The sampler loop of `sampling.sample`, classifier-free guided where the model has a null
  condition (text, class). Latents out; the decoder is not included."""
  model, denoise, x_T, payload, n = _sampling_setup(config, mesh, batch_per_chip, guidance)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))

  def loop(x_T, payload, rng):
    return samplers_lib.sample(denoise, model.schedule, x_T, payload, rng, sampler=sampler,
                               steps=int(steps),
                               parameterization=model.config.diffusion.parameterization)

  fn = jax.jit(loop, out_shardings=parallel.batch_sharding(mesh))
  return Program("sample_loop", fn, (x_T, payload, rng), images=n)


def sample_step(config, mesh, *, batch_per_chip: int, guidance: float = 7.5) -> Program:
  """One denoiser call of the sampling loop (both guidance branches): XLA's cost analysis counts
  a loop body once, so the loop's FLOPs and time are this program's times the step count."""
  _, denoise, x_T, payload, n = _sampling_setup(config, mesh, batch_per_chip, guidance)
  t = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=parallel.batch_sharding(mesh))
  fn = jax.jit(lambda x, t, c: denoise(x, t, c), out_shardings=parallel.batch_sharding(mesh))
  return Program("sample_step", fn, (x_T, t, payload), images=n)


def lower_program(program: Program, attention_kernel: bool = True):
  """(lowered, {trace, trace_cpu} seconds): traced and lowered for the program's devices.

  attention_kernel: False traces without the mesh context, so TPU attention keeps its one-block
    einsum form instead of the Pallas kernel (what the kernel saves, measured on the same code).
  """
  wall, cpu = time.perf_counter(), time.process_time()
  mesh = next(a.sharding.mesh for a in jax.tree.leaves(program.args)
              if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding))
  # Kernels that need the mesh (TPU attention) find it here.
  context = platform.mesh_context(mesh) if attention_kernel else contextlib.nullcontext()
  with context:
    lowered = program.fn.lower(*program.args)
  return lowered, {"trace": time.perf_counter() - wall, "trace_cpu": time.process_time() - cpu}


class HbmRefusal(Exception):
  """XLA's TPU compiler refused the program: its temporaries exceed the chip's HBM."""

  def __init__(self, temp_bytes: int, available_bytes: int, seconds: dict[str, float]):
    super().__init__(f"temporaries of {temp_bytes} bytes exceed the {available_bytes} bytes of "
                     f"HBM available")
    self.temp_bytes, self.available_bytes, self.seconds = temp_bytes, available_bytes, seconds


def compile_program(program: Program, attention_kernel: bool = True):
  """(compiled, {trace, compile, trace_cpu, compile_cpu} seconds); attention_kernel as in
  `lower_program`. Raises HbmRefusal when the program does not fit the chip at all.

  CPU seconds are this process's (all threads): on a shared machine they say more about the
  compiler's work than wall time does.
  """
  lowered, seconds = lower_program(program, attention_kernel)
  wall, cpu = time.perf_counter(), time.process_time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    refusal = report.hbm_refusal(str(e))
    if refusal is None:
      raise
    seconds.update(compile=time.perf_counter() - wall, compile_cpu=time.process_time() - cpu)
    raise HbmRefusal(**refusal, seconds=seconds) from None
  seconds.update(compile=time.perf_counter() - wall, compile_cpu=time.process_time() - cpu)
  return compiled, seconds
