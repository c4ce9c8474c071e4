"""First-stage autoencoders of latent diffusion: AutoencoderKL and VQModel (CompVis `ldm`).

Both wrap the same Encoder/Decoder trunk (`autoencoder_blocks.py`) around a latent bottleneck:
  KL: encoder -> quant_conv (1x1, 2z -> 2*embed_dim) -> DiagonalGaussian(mean, logvar);
      decode: post_quant_conv (1x1, embed_dim -> z) -> decoder.
  VQ: encoder -> quant_conv (1x1, z -> embed_dim) = h, the latent an LDM diffuses;
      decode: VectorQuantizer(h) -> post_quant_conv -> decoder.
Images are NHWC in [-1, 1]. The latent distribution, the codebook search and the losses are computed
in float32 whatever the compute dtype; reconstructions are returned in float32.

Use `model.apply({"params": p}, x, method=model.encode)` etc.; `__call__` of AutoencoderKL draws its
posterior sample from the 'sample' rng stream.
"""

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import layers
from ldm_jax.models.autoencoder_blocks import Decoder, Encoder

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # CompVis DiagonalGaussianDistribution clamp


@flax.struct.dataclass
class DiagonalGaussian:
  """A diagonal Gaussian over latents; mean and logvar are [B, h, w, C] float32."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits [B, h, w, 2C] moments into (mean, logvar) on channels; clamps logvar to [-30, 20]."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # [B, h, w, C] each
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """mean + std * eps with eps ~ N(0, I); [B, h, w, C]."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
    """KL(self || other), other = N(0, I) by default, summed over h, w, C: [B]."""
    if other is None:
      terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    else:
      terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
               - self.logvar + other.logvar)
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

  def nll(self, x: jax.Array, axis: Sequence[int] = (1, 2, 3)) -> jax.Array:
    """Negative log-likelihood of x under the Gaussian, summed over `axis`: [B] by default."""
    x = x.astype(jnp.float32)
    terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var
    return 0.5 * jnp.sum(terms, axis=tuple(axis))


def _codebook_init(n_e: int):
  """Uniform(-1/n_e, 1/n_e), as taming's VectorQuantizer initialises its embedding."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-1.0 / n_e, maxval=1.0 / n_e)
  return init


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantisation with a straight-through gradient (taming VectorQuantizer2).

  legacy=True (the CompVis / taming default, used by every released LDM first stage) computes
    loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2),
  i.e. beta weighs the codebook term; legacy=False puts beta on the commitment term (the VQ-VAE
  paper's form). The forward value is (1 + beta) * mse either way; only the gradients differ.
  """
  n_e: int
  e_dim: int
  beta: float = 0.25
  legacy: bool = True
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", _codebook_init(self.n_e), (self.n_e, self.e_dim),
                                self.param_dtype)  # [n_e, e_dim]

  def __call__(self, z: jax.Array):
    """z [B, h, w, e_dim] -> (z_q [B, h, w, e_dim] f32, loss scalar f32, indices [B, h, w] i32)."""
    if z.shape[-1] != self.e_dim:
      raise ValueError(f"VectorQuantizer: input channels={z.shape[-1]}; expected "
                       f"e_dim={self.e_dim}.")
    z = z.astype(jnp.float32)
    codebook = self.embedding.astype(jnp.float32)  # [n_e, e_dim]
    flat = z.reshape(-1, self.e_dim)  # [N, e_dim]
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e; full-precision matmul so TPUs pick the same entries.
    cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)  # [N, n_e]
    dist = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)[None]
            - 2.0 * cross)  # [N, n_e]
    indices = jnp.argmin(dist, axis=1).astype(jnp.int32)  # [N]
    z_q = codebook[indices].reshape(z.shape)  # [B, h, w, e_dim]

    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook_term = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    if self.legacy:
      loss = commitment + self.beta * codebook_term
    else:
      loss = self.beta * commitment + codebook_term
    # Straight-through: forward value z_q, gradient w.r.t. z is the identity.
    z_q = z + jax.lax.stop_gradient(z_q - z)
    return z_q, loss, indices.reshape(z.shape[:-1])

  def lookup(self, indices: jax.Array) -> jax.Array:
    """indices [B, h, w] -> codebook entries [B, h, w, e_dim] float32."""
    return self.embedding.astype(jnp.float32)[indices]


class _FirstStage(nn.Module):
  """The CompVis `ddconfig` fields shared by both autoencoders (see autoencoder_blocks.Encoder).

  `double_z` may be left as None: it is implied by the model (True for KL, False for VQ), and an
  explicit contradicting value is an error, as the CompVis classes assert.
  """
  ch: int
  out_ch: int
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  in_channels: int
  resolution: int
  z_channels: int
  ch_mult: Sequence[int] = (1, 2, 4, 8)
  dropout: float = 0.0
  double_z: bool | None = None
  attn_type: str = "vanilla"
  resamp_with_conv: bool = True
  tanh_out: bool = False
  norm_num_groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # The adaptive GAN weight of the training loss differentiates w.r.t. this kernel.
  decoder_last_layer_path: ClassVar[tuple[str, ...]] = ("decoder", "conv_out", "kernel")
  _double_z: ClassVar[bool]

  def _trunk(self):
    name = type(self).__name__
    if self.double_z is not None and bool(self.double_z) != self._double_z:
      raise ValueError(f"{name}.double_z={self.double_z}; {name} requires double_z="
                       f"{self._double_z} (or leave it unset).")
    common = dict(ch=self.ch, out_ch=self.out_ch, num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), in_channels=self.in_channels,
                  resolution=self.resolution, z_channels=self.z_channels,
                  ch_mult=tuple(self.ch_mult), dropout=self.dropout, attn_type=self.attn_type,
                  resamp_with_conv=self.resamp_with_conv, norm_num_groups=self.norm_num_groups,
                  double_z=self._double_z, remat=self.remat, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    return Encoder(**common), Decoder(tanh_out=self.tanh_out, **common)

  def _conv1x1(self, features: int) -> nn.Conv:
    return layers.conv(features, 1, dtype=self.dtype, param_dtype=self.param_dtype)

  def _decode_latent(self, z: jax.Array, deterministic: bool) -> jax.Array:
    h = self.post_quant_conv(z.astype(self.dtype))  # [B, h, w, z_channels]
    return self.decoder(h, deterministic).astype(jnp.float32)  # [B, H, W, out_ch]


class AutoencoderKL(_FirstStage, kw_only=True):
  """KL-regularised autoencoder (CompVis `ldm.models.autoencoder.AutoencoderKL`)."""
  embed_dim: int
  _double_z: ClassVar[bool] = True

  def setup(self):
    self.encoder, self.decoder = self._trunk()
    self.quant_conv = self._conv1x1(2 * self.embed_dim)
    self.post_quant_conv = self._conv1x1(self.z_channels)

  def encode(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussian:
    """x [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, embed_dim]."""
    moments = self.quant_conv(self.encoder(x, deterministic))  # [B, h, w, 2*embed_dim]
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
    """z [B, h, w, embed_dim] -> reconstruction [B, h*f, w*f, out_ch] float32."""
    return self._decode_latent(z, deterministic)

  def __call__(self, x: jax.Array, sample_posterior: bool = True, deterministic: bool = True):
    """x -> (reconstruction [B, H, W, out_ch], posterior); samples with the 'sample' rng."""
    posterior = self.encode(x, deterministic)
    z = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
    return self.decode(z, deterministic), posterior


class VQModel(_FirstStage, kw_only=True):
  """Vector-quantised autoencoder (CompVis `ldm.models.autoencoder.VQModel`, no index remapping)."""
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  _double_z: ClassVar[bool] = False

  def setup(self):
    self.encoder, self.decoder = self._trunk()
    self.quant_conv = self._conv1x1(self.embed_dim)
    self.quantizer = VectorQuantizer(self.n_embed, self.embed_dim, beta=self.beta,
                                     legacy=self.legacy, param_dtype=self.param_dtype)
    self.post_quant_conv = self._conv1x1(self.z_channels)

  def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x [B, H, W, in_channels] -> pre-quantisation latent h [B, H/f, W/f, embed_dim] float32."""
    return self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)

  def quantize(self, h: jax.Array):
    """h -> (z_q [B, h, w, embed_dim], codebook loss scalar, indices [B, h, w])."""
    return self.quantizer(h)

  def decode(self, h: jax.Array, force_not_quantize: bool = False,
             deterministic: bool = True) -> jax.Array:
    """Quantises h first (as LatentDiffusion.decode_first_stage does) unless told not to."""
    if not force_not_quantize:
      h, _, _ = self.quantizer(h)
    return self._decode_latent(h, deterministic)

  def decode_code(self, indices: jax.Array, deterministic: bool = True) -> jax.Array:
    """Codebook indices [B, h, w] -> reconstruction [B, h*f, w*f, out_ch]."""
    return self._decode_latent(self.quantizer.lookup(indices), deterministic)

  def __call__(self, x: jax.Array, deterministic: bool = True):
    """x -> (reconstruction, codebook loss, indices [B, h, w])."""
    z_q, loss, indices = self.quantizer(self.encode(x, deterministic))
    return self._decode_latent(z_q, deterministic), loss, indices


def abstract_params(model: _FirstStage):
  """The model's parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
  # The smallest input the trunk accepts: parameter shapes do not depend on the image size.
  side = 2 ** (len(model.ch_mult) - 1)
  x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)

  def init(x):
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
    return model.init(rngs, x)["params"]
  return jax.eval_shape(init, x)
