"""The benchmarked models, built once in torch and imported into ldm_jax and diffusers-Flax.

The benchmarked architectures:
  * UNet: text-conditional, model_channels 64, channel_mult (1, 2, 4, 4), attention at downsample
    factors 1, 2, 4, 2 res blocks, 8 heads, context 77 x 256, on 32 x 32 x 4 latents.
  * Decoder: the kl-f8 autoencoder (ch 128, mult (1, 2, 4, 4), 2 res blocks), 32 x 32 x 4 -> 256 px.

The torch models are diffusers' `UNet2DConditionModel` / `AutoencoderKL` with every weight re-drawn
non-zero (diffusers zero-initialises conv_out and proj_out, which would make the UNet output 0).
ldm_jax gets them through its own importers (`ldm_jax.convert`), diffusers-Flax through
`convert_pytorch_state_dict_to_flax`, so all three run the same function with the same weights;
`check_agreement` verifies that before anything is timed. Both JAX peers' parameters are device
arrays (diffusers' converter returns jnp arrays; ldm_jax's importer returns numpy, put on the
device here), as torch's live in its module: host arrays would be copied in on every call.

diffusers-Flax exists only up to diffusers 0.39.0; `peers.py` puts that release (installed with
`pip install --no-deps --target .venv/bench-deps diffusers==0.39.0`) first on sys.path.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
import torch

LATENT = 32          # latent height and width
CONTEXT = (77, 256)  # text context [tokens, width]
UNET_CONFIG = dict(
    sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=CONTEXT[1],
    attention_head_dim=8)  # diffusers' SD-1 naming: this is the number of heads
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=8 * LATENT)


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
  """In place: weights ~ N(0, std), 1-D weights (norm scales) ~ 1 + N(0, std); returns module."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      p.copy_(1.0 + noise if name.endswith("weight") and p.ndim == 1 else noise)
  return module.eval()


class _ShapesOnly:
  """Stands in for a diffusers-Flax model in `convert_pytorch_state_dict_to_flax`, which only reads
  the names and shapes of a fresh init: eval_shape gives them without running the network (a real
  init of the 256 px autoencoder takes a minute on 2 cores)."""

  def __init__(self, model):
    self._model = model

  def init_weights(self, rng):
    import jax
    return jax.eval_shape(self._model.init_weights, rng)


def _flax_params(torch_module: torch.nn.Module, flax_model):
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  return convert_pytorch_state_dict_to_flax(torch_module.state_dict(), _ShapesOnly(flax_model))


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


@dataclasses.dataclass
class Peers:
  """One network in the three implementations: torch module, (ldm_jax module, params),
  (diffusers-Flax module, params)."""
  torch: torch.nn.Module
  ours: Any
  ours_params: Any
  flax: Any
  flax_params: Any


def build_unet(seed: int = 0, remat: bool = False, dtype=None) -> Peers:
  """The benchmark's UNet in torch, ldm_jax and diffusers-Flax with the same random weights."""
  import jax.numpy as jnp
  from diffusers import FlaxUNet2DConditionModel, UNet2DConditionModel
  from ldm_jax.convert import unet as unet_convert
  from ldm_jax.models import unet as unet_lib
  dtype = dtype or jnp.float32
  torch_unet = randomize_(UNet2DConditionModel(**UNET_CONFIG), seed=seed)
  kwargs = unet_convert.unet_kwargs_from_diffusers_config(dict(torch_unet.config))
  ours = unet_lib.UNetModel(**kwargs, remat=remat, dtype=dtype)
  ours_params = unet_convert.unet_from_diffusers(_numpy_state(torch_unet), ours)
  flax_unet = FlaxUNet2DConditionModel(**UNET_CONFIG, dtype=dtype)
  flax_params = _flax_params(torch_unet, flax_unet)
  return Peers(torch_unet, ours, jax.device_put(ours_params), flax_unet, flax_params)


def build_vae(seed: int = 1, dtype=None) -> Peers:
  """The kl-f8 autoencoder in torch, ldm_jax and diffusers-Flax with the same random weights."""
  import jax.numpy as jnp
  from diffusers import AutoencoderKL, FlaxAutoencoderKL
  from ldm_jax.convert import autoencoder as ae_convert
  from ldm_jax.models import autoencoder as ae_lib
  dtype = dtype or jnp.float32
  torch_vae = randomize_(AutoencoderKL(**VAE_CONFIG), seed=seed)
  _, kwargs = ae_convert.autoencoder_kwargs_from_diffusers_config(dict(torch_vae.config))
  ours = ae_lib.AutoencoderKL(**kwargs, dtype=dtype)
  ours_params = ae_convert.autoencoder_from_diffusers(_numpy_state(torch_vae), ours)
  flax_vae = FlaxAutoencoderKL(**VAE_CONFIG, dtype=dtype)
  flax_params = _flax_params(torch_vae, flax_vae)
  return Peers(torch_vae, ours, jax.device_put(ours_params), flax_vae, flax_params)


def unet_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """x [B, 32, 32, 4] (NHWC), t [B] int32, context [B, 77, 256]."""
  rs = np.random.RandomState(seed)
  return dict(x=rs.randn(batch, LATENT, LATENT, 4).astype(np.float32),
              t=rs.randint(0, 1000, size=batch).astype(np.int32),
              context=rs.randn(batch, *CONTEXT).astype(np.float32))


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| / max(1, max |want|): the parity tests' measure."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def check_agreement(unet: Peers | None, vae: Peers | None, tol: float = 1e-3) -> dict[str, float]:
  """Runs each network once in the three implementations; raises if any output disagrees.

  The tolerance (1e-3 of the output scale) is loose enough for fp32 reduction-order differences in
  a 30-layer network and tight enough that a wrong import (a missing transpose, a swapped weight)
  fails by orders of magnitude. Returns the relative errors.
  """
  import jax.numpy as jnp
  errors = {}
  if unet is not None:
    inp = unet_inputs(2, seed=123)
    with torch.no_grad():
      want = nhwc(unet.torch(torch.from_numpy(nchw(inp["x"])), torch.from_numpy(inp["t"]).long(),
                             encoder_hidden_states=torch.from_numpy(inp["context"])).sample)
    ours = unet.ours.apply({"params": unet.ours_params}, jnp.asarray(inp["x"]),
                           jnp.asarray(inp["t"]), jnp.asarray(inp["context"]))
    flax = unet.flax.apply({"params": unet.flax_params}, jnp.asarray(nchw(inp["x"])),
                           jnp.asarray(inp["t"]), jnp.asarray(inp["context"])).sample
    errors["unet/ldm_jax"] = relative_error(ours, want)
    errors["unet/diffusers_flax"] = relative_error(nhwc(flax), want)
    errors["unet/scale"] = float(np.abs(want).max())
  if vae is not None:
    z = np.random.RandomState(5).randn(1, LATENT, LATENT, 4).astype(np.float32)
    with torch.no_grad():
      want = nhwc(vae.torch.decode(torch.from_numpy(nchw(z))).sample)
    ours = vae.ours.apply({"params": vae.ours_params}, jnp.asarray(z), method=vae.ours.decode)
    flax = vae.flax.apply({"params": vae.flax_params}, jnp.asarray(nchw(z)),
                          method=vae.flax.decode).sample
    errors["decode/ldm_jax"] = relative_error(ours, want)
    errors["decode/diffusers_flax"] = relative_error(nhwc(flax), want)
    errors["decode/scale"] = float(np.abs(want).max())
  bad = {k: v for k, v in errors.items() if not k.endswith("scale") and not v <= tol}
  if bad:
    raise AssertionError(f"peers disagree before timing: {bad} (tolerance {tol} of the output "
                         f"scale); all errors: {errors}")
  return errors
