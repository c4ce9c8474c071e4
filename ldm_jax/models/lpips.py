"""LPIPS perceptual distance, the "vgg" variant of the `lpips` package (v0.1), in Flax.

The metric of Zhang et al. 2018 as used by the CompVis / taming autoencoder losses:

  1. ScalingLayer: (x - shift) / scale per RGB channel (inputs are in [-1, 1]).
  2. VGG16 `features` trunk, tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
  3. Each tap is unit-normalised over channels: f / (||f||_2 + 1e-10).
  4. Squared difference of the two images' normalised features.
  5. A 1x1 conv to one channel without bias (NetLinLayer; its dropout is off at inference).
  6. Spatial mean, then the sum over the five taps -> [B].

Parameters are named after the torch modules so conversion is a rename: `features_{i}` is
torchvision's `vgg16().features[i]` (a conv) and `lin{k}` is the lpips package's `lin{k}.model.1`.
The trunk and heads are never trained here: `lpips_fn` wraps the parameters in `stop_gradient`,
while gradients still flow to the images (the generator loss needs them).
"""

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import conv

Dtype = Any

# lpips.ScalingLayer: ImageNet statistics re-expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 `features` as torchvision builds it: (torch index of each conv, its width), grouped into
# the five lpips slices. Each slice after the first starts with MaxPool2d(2, 2) (the torch
# indices 4, 9, 16 and 23); every conv is 3x3 with padding 1 and followed by ReLU.
VGG16_SLICES = (
    ((0, 64), (2, 64)),                         # -> relu1_2 (index 3)
    ((5, 128), (7, 128)),                       # -> relu2_2 (index 8)
    ((10, 256), (12, 256), (14, 256)),          # -> relu3_3 (index 15)
    ((17, 512), (19, 512), (21, 512)),          # -> relu4_3 (index 22)
    ((24, 512), (26, 512), (28, 512)),          # -> relu5_3 (index 29)
)
CHANNELS = tuple(s[-1][1] for s in VGG16_SLICES)  # (64, 128, 256, 512, 512)
NORM_EPS = 1e-10


def normalize_channels(feat: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """lpips.normalize_tensor over the channel axis of NHWC: f / (||f||_2 + eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(feat), axis=-1, keepdims=True))  # [B, H, W, 1]
  return feat / (norm + eps)


class VGG16Features(nn.Module):
  """The VGG16 convolutional trunk, returning the five lpips taps (NHWC)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    h = x.astype(self.dtype)  # [B, H, W, 3]
    for s, convs in enumerate(VGG16_SLICES):
      if s > 0:
        # MaxPool2d(2, 2) floors odd sizes, as VALID pooling does.
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")  # [B, H/2, W/2, C]
      for index, width in convs:
        h = conv(width, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                 name=f"features_{index}")(h)
        h = nn.relu(h)  # [B, h, w, width]
      taps.append(h)
    return taps


class LPIPS(nn.Module):
  """LPIPS(vgg) distance between two image batches.

  Call with x0, x1: [B, H, W, 3] in [-1, 1]. Returns [B] float32, or [B, 1, 1, 1] with
  keepdims=True (the shape the torch package returns, which CompVis broadcasts onto pixels).
  deterministic=False applies the heads' dropout (needs rngs={'dropout': key}).
  The trunk runs in `dtype`; the normalisation, difference and heads run in float32.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array, keepdims: bool = False,
               deterministic: bool = True) -> jax.Array:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS: inputs have shapes {x0.shape} and {x1.shape}; expected two equal "
                       "[B, H, W, 3] RGB batches in [-1, 1].")
    batch = x0.shape[0]
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    # One trunk pass over both batches: the trunk has no batch-coupled layers.
    x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)  # [2B, H, W, 3]
    x = (x - shift) / scale
    taps = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="net")(x)
    total = jnp.zeros((batch,), jnp.float32)
    for k, feat in enumerate(taps):
      feat = normalize_channels(feat.astype(jnp.float32))  # [2B, h, w, C_k]
      diff = jnp.square(feat[:batch] - feat[batch:])  # [B, h, w, C_k]
      # NetLinLayer's Dropout(0.5). Off by default (the metric); CompVis / taming training runs
      # it ON, because Lightning's model.train() also reaches the loss's LPIPS: pass
      # deterministic=False with a 'dropout' rng to reproduce that.
      diff = nn.Dropout(0.5)(diff, deterministic=deterministic)
      # NetLinLayer: 1x1 conv C_k -> 1 without bias, i.e. a Dense on channels.
      lin = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                     name=f"lin{k}")(diff)  # [B, h, w, 1]
      total = total + jnp.mean(lin, axis=(1, 2, 3))  # [B]
    return total.reshape(batch, 1, 1, 1) if keepdims else total


def lpips_template(dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
  """The LPIPS parameter tree as shapes only (nothing allocated)."""
  model = LPIPS(dtype=dtype, param_dtype=param_dtype)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x)["params"]


def lpips_fn(params: Mapping[str, Any], dtype: Dtype = jnp.float32
             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A frozen distance d(x0, x1) -> [B]: no gradient reaches `params`, only the images."""
  model = LPIPS(dtype=dtype)

  def distance(x0: jax.Array, x1: jax.Array) -> jax.Array:
    frozen = jax.lax.stop_gradient(params)
    return model.apply({"params": frozen}, x0, x1)

  return distance
