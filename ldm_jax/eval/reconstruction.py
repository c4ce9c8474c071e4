"""First-stage evaluation: reconstruct images through an autoencoder; PSNR, SSIM, LPIPS and rFID.

The columns of the paper's first-stage table. Reconstructions are deterministic (the KL posterior's
mode; VQ: the nearest codes), clipped to [-1, 1] and rounded to uint8 as a saved image would be;
PSNR and SSIM compare uint8 images (data range 255), LPIPS(vgg) the float images, and rFID is the
FID between the reconstructions and their inputs. `evaluate.py autoencoder` drives it.
"""

import functools
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.eval import fid
from ldm_jax.eval import image_metrics
from ldm_jax.sample_cli import UserError


def load_first_stage(checkpoint: str | None, compvis_ckpt: str | None = None,
                     compvis_yaml: str | None = None) -> tuple[Any, dict, dict]:
  """(module, variables, first-stage config) from an autoencoder / LDM workdir or saved model
  (`checkpoint`), or a CompVis checkpoint with its YAML. Mistakes raise UserError."""
  from ldm_jax import model_io
  from ldm_jax.convert import common
  from ldm_jax.models import build
  from ldm_jax.train import ae_trainer
  try:
    if compvis_ckpt:
      return _compvis_first_stage(compvis_ckpt, compvis_yaml)
    if not checkpoint:
      raise UserError("give --checkpoint (an autoencoder or LDM workdir, or a saved model) or "
                      "--compvis_ckpt with --compvis_yaml.")
    path = checkpoint
    if os.path.isfile(os.path.join(path, ae_trainer.FIRST_STAGE_FILE)):  # Stage-1 workdir.
      cfg = ae_trainer.read_first_stage_config(path).to_dict()
      variables = ae_trainer.load_autoencoder(path, cfg)
    else:  # A saved model or stage-2 workdir: its first stage.
      config, params = model_io.load_model(path, use_ema=True)
      cfg, variables = config.first_stage.to_dict(), params["first_stage"]
  except UserError:
    raise
  except (model_io.CheckpointNotFoundError, FileNotFoundError) as e:
    raise UserError(f"cannot load the autoencoder: {e}") from None
  except (common.WeightLoadError, ValueError, OSError, KeyError) as e:
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    raise UserError("cannot load the autoencoder: " + "; ".join(lines[:4])) from None
  return build.build_first_stage(cfg), variables, cfg


def _compvis_first_stage(ckpt: str, yaml_path: str | None):
  """A stand-alone CompVis first stage (e.g. the zoo's kl-f8 model.ckpt with its config.yaml)."""
  import yaml
  from ldm_jax.convert import autoencoder as ae_convert
  from ldm_jax.convert import compvis_config
  from ldm_jax.convert import torch_io
  from ldm_jax.models import build
  if not yaml_path:
    raise UserError("--compvis_ckpt needs --compvis_yaml (the autoencoder's config.yaml).")
  with open(yaml_path) as f:
    node = (yaml.safe_load(f) or {}).get("model")
  if node is None:
    raise UserError(f"--compvis_yaml={yaml_path}: no top-level 'model' entry.")
  cfg = compvis_config.first_stage_config(node, "model")
  state_dict = torch_io.load_state_dict(ckpt)
  prefix = "first_stage_model."  # A whole LDM checkpoint holds its first stage under this prefix.
  if any(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  module = build.build_first_stage(cfg)
  return module, {"params": ae_convert.autoencoder_from_compvis(state_dict, module)}, cfg


@functools.partial(jax.jit, static_argnums=(0,))
def reconstruct(module, variables, images):
  """[B, H, W, 3] in [-1, 1] -> reconstructions, deterministically: the KL posterior's mode, or
  the VQ code nearest to the encoding (the first stage as the LDM sees it)."""
  if hasattr(module, "quantize"):
    h = module.apply(variables, images, method=module.encode)
    return module.apply(variables, h, method=module.decode)
  posterior = module.apply(variables, images, method=module.encode)
  return module.apply(variables, posterior.mode(), method=module.decode)


def evaluate_autoencoder(module, variables, images: Iterable[np.ndarray], count: int, *,
                         batch_size: int, extractor=None, lpips_params=None,
                         progress: Callable[..., Iterable] | None = None) -> dict[str, Any]:
  """PSNR / SSIM (uint8, data range 255), LPIPS and rFID of reconstructions of `images` (uint8
  [H, W, 3], all one size); LPIPS needs lpips_params, rFID the Inception extractor."""
  from ldm_jax.models import lpips as lpips_lib
  lpips = lpips_lib.lpips_fn(lpips_params) if lpips_params is not None else None
  sums: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
  pools: dict[str, list[np.ndarray]] = {"real": [], "rec": []}
  factor = 2 ** (len(module.ch_mult) - 1)
  batches = _batched(images, batch_size, factor)
  if progress is not None:  # progress(iterable, total, desc), e.g. evaluate.progress
    batches = progress(batches, -(-count // batch_size), "reconstructing")
  for batch in batches:
    n = len(batch)
    padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])  # one compilation
    x = jnp.asarray(padded, jnp.float32) / 127.5 - 1.0  # [B, H, W, 3]
    rec = jnp.clip(reconstruct(module, variables, x), -1.0, 1.0)
    rec_u8 = np.asarray(jnp.round((rec + 1.0) * 127.5), np.uint8)[:n]  # as it would be saved
    sums["psnr"].append(np.asarray(image_metrics.psnr(batch, rec_u8, data_range=255.0)))
    sums["ssim"].append(np.asarray(image_metrics.ssim(batch, rec_u8, data_range=255.0)))
    if lpips is not None:
      sums["lpips"].append(np.asarray(lpips(x, rec))[:n])
    if extractor is not None:  # One call for both halves: fewer, fuller Inception batches.
      pool = extractor(np.concatenate([batch, rec_u8]), outputs=("pool",))["pool"]  # [2n, 2048]
      pools["real"].append(pool[:n])
      pools["rec"].append(pool[n:])
  out: dict[str, Any] = {"num_images": int(sum(len(v) for v in sums["psnr"]))}
  for name, values in sums.items():
    if values:
      v = np.concatenate(values)
      out[name], out[name + "_std"] = float(np.mean(v)), float(np.std(v))
  if extractor is not None:
    real, rec = (np.concatenate(pools[k]) for k in ("real", "rec"))
    out["rfid"] = float(fid.frechet_distance(*fid.feature_statistics(rec),
                                             *fid.feature_statistics(real), features1=rec))
  return out


def _batched(images: Iterable[np.ndarray], batch_size: int, factor: int) -> Iterator[np.ndarray]:
  batch = []
  for image in images:
    if image.shape[0] % factor or image.shape[1] % factor:
      raise UserError(f"an image of {image.shape[1]}x{image.shape[0]} px: the first stage needs "
                      f"multiples of its factor {factor}; give --image_size.")
    if batch and image.shape != batch[0].shape:
      raise UserError(f"images of sizes {batch[0].shape[:2]} and {image.shape[:2]} in one set; "
                      "give --image_size to centre-crop them all to one size.")
    batch.append(image)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)
