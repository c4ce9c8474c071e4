"""The PatchGAN discriminator of taming-transformers (`NLayerDiscriminator`), in Flax.

Architecture (torch indices of `main`, n_layers=3): conv 4x4/2 + LeakyReLU(0.2); then n_layers-1
times conv 4x4/2 + norm + LeakyReLU; then conv 4x4/1 + norm + LeakyReLU; then conv 4x4/1 to one
logit per patch. Every conv pads 1 on each side; widths ndf * min(2**n, 8).

Norm: BatchNorm2d (use_actnorm=False; the convs before it have no bias) or ActNorm (True; convs
keep their bias). Parameters are named `main_{i}` after the torch index, so a
`loss.discriminator.main.{i}.*` state dict maps by renaming.

BatchNorm follows torch exactly: training normalises with the biased batch variance and updates
the running averages with momentum 0.1 using the *unbiased* variance (Flax's BatchNorm uses the
biased one); eps 1e-5; statistics in float32. Running averages live in the `batch_stats`
collection: apply with `train=True, mutable=['batch_stats']` for a torch-train-mode pass.

ActNorm is initialised from data as in taming (where the first train-mode batch does it): call
`init` with a real training batch, not zeros; each ActNorm sets loc = -mean and
scale = 1 / (std + 1e-6) (unbiased std, per channel) of its input. On a constant batch the scale
would be 1e6. The conv weights depend only on the rng, so re-running `init` with the same rng
and a real batch fixes a model initialised on dummy data.

Initialisation as `weights_init`: conv kernels N(0, 0.02); BatchNorm scale N(1, 0.02), bias 0.
Conv biases keep torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch convention: new = (1 - m) * old + m * batch
ACTNORM_EPS = 1e-6
LEAKY_SLOPE = 0.2


def _torch_conv_bias_init(key, shape, dtype, fan_in):
  bound = 1.0 / fan_in ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over NHWC (train: batch statistics; eval: running averages)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d), (c,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    mean_ra = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var_ra = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      n = x.size // c
      mean = jnp.mean(x32, axis=(0, 1, 2))  # [C]
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # [C], biased
      if not self.is_initializing():
        unbiased = var * (n / max(n - 1, 1))
        mean_ra.value = (1 - BN_MOMENTUM) * mean_ra.value + BN_MOMENTUM * mean
        var_ra.value = (1 - BN_MOMENTUM) * var_ra.value + BN_MOMENTUM * unbiased
    else:
      mean, var = mean_ra.value, var_ra.value
    y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPS)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ActNorm(nn.Module):
  """taming's ActNorm: scale * (x + loc), both per channel and initialised from the first batch."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train  # ActNorm behaves the same in both modes once initialised.
    x32 = x.astype(jnp.float32)
    c = x.shape[-1]
    flat = x32.reshape(-1, c)  # [B*H*W, C]
    # Data-dependent init: these initialisers only run inside `init`, on the batch given there.
    loc = self.param("loc", lambda k: (-jnp.mean(flat, axis=0)).astype(self.param_dtype))
    scale = self.param("scale", lambda k: (1.0 / (jnp.std(flat, axis=0, ddof=1) + ACTNORM_EPS)
                                           ).astype(self.param_dtype))
    y = scale.astype(jnp.float32) * (x32 + loc.astype(jnp.float32))
    return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: [B, H, W, input_nc] in [-1, 1] -> patch logits [B, H', W', 1] (float32).

  train=True is torch's train mode (BatchNorm on batch statistics; pass
  mutable=['batch_stats'] to keep the updated running averages), train=False its eval mode.

  For 256x256 inputs and n_layers=3 the output is [B, 30, 30, 1].
  """
  input_nc: int = 3
  ndf: int = 64
  n_layers: int = 3
  use_actnorm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, stride: int, use_bias: bool, in_features: int, index: int):
    return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(0.02),
                   bias_init=lambda k, s, d: _torch_conv_bias_init(k, s, d, in_features * 16),
                   name=f"main_{index}")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.input_nc:
      raise ValueError(f"NLayerDiscriminator: input shape {x.shape}; expected [B, H, W, "
                       f"{self.input_nc}] (input_nc={self.input_nc}).")
    if self.n_layers < 1:
      raise ValueError(f"NLayerDiscriminator.n_layers={self.n_layers}; expected >= 1.")
    norm_cls = ActNorm if self.use_actnorm else BatchNorm
    use_bias = self.use_actnorm  # BatchNorm's shift makes a conv bias redundant
    h = x.astype(self.dtype)
    h = self._conv(self.ndf, 2, True, self.input_nc, 0)(h)  # [B, H/2, W/2, ndf]
    h = nn.leaky_relu(h, LEAKY_SLOPE)
    index, mult = 2, 1
    # n_layers - 1 strided blocks, then one stride-1 block; each is conv, norm, LeakyReLU.
    for n in range(1, self.n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = self._conv(self.ndf * mult, stride, use_bias, self.ndf * prev, index)(h)
      h = norm_cls(dtype=self.dtype, param_dtype=self.param_dtype, name=f"main_{index + 1}")(
          h, train)
      h = nn.leaky_relu(h, LEAKY_SLOPE)  # [B, h, w, ndf * mult]
      index += 3
    logits = self._conv(1, 1, True, self.ndf * mult, index)(h)  # [B, H', W', 1]
    return logits.astype(jnp.float32)
