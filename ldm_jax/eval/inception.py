"""The FID Inception-v3 network (pytorch-fid's `fid_inception_v3`) in Flax, NHWC.

FID, KID and the Inception Score are defined on the TensorFlow Inception graph of 2015-12-05. The
`pytorch-fid` package ported its weights into torchvision's Inception3 layout
(`pt_inception-2015-12-05-6726825d.pth`); this module is the same network, so those weights load by
renaming (`ldm_jax.convert.inception`). The FID graph differs from torchvision's Inception3 in three
places, all reproduced here:
  * every average pool inside the Inception blocks (Mixed_5b..5d, 6b..6e, 7b) ignores the zero
    padding (TF's `count_include_pad=False`);
  * the last block (Mixed_7c) pools its fourth branch with a 3x3 *max* pool instead;
  * the classifier has 1008 outputs (the TF graph's classes), not 1000.
The input pipeline is pytorch-fid's: images in [0, 1] are resized to 299x299 with torch's bilinear
interpolation (`F.interpolate(mode='bilinear', align_corners=False)`, which never antialiases, also
when shrinking) and then mapped to [-1, 1].

Every BasicConv2d is conv (no bias) -> BatchNorm (inference: running statistics, eps 0.001) -> ReLU.
The BatchNorm statistics are ordinary leaves of the one `params` tree (`bn/{scale,bias,mean,var}`),
so the network is a pure `apply(params, x)`; nothing here is ever trained.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

IMAGE_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3  # torchvision BasicConv2d: BatchNorm2d(eps=0.001), as in the TF graph


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def preprocess(images) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1] (pytorch-fid's ToTensor); floats pass through."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def resize_bilinear(x: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
  """torch `F.interpolate(x, (size, size), mode='bilinear', align_corners=False)` on NHWC.

  Half-pixel centres and edge clamping match torch; antialias=False because torch's bilinear mode
  does not filter when it shrinks an image (jax.image.resize would by default).
  """
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x  # torch's bilinear resize to the same size is the identity as well
  return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv without bias, inference BatchNorm (eps 0.001), ReLU."""
  features: int
  kernel: Any = 1          # int or (kh, kw)
  stride: int = 1
  padding: Any = 0         # int or (ph, pw), symmetric like torch
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    y = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
    bn = BatchNormStats(self.features, param_dtype=self.param_dtype, name="bn")
    return nn.relu(bn(y)).astype(self.dtype)  # [B, H', W', features]


class BatchNormStats(nn.Module):
  """Inference-mode BatchNorm whose running statistics are parameters (float32 arithmetic)."""
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.features,)
    scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
    mean = self.param("mean", nn.initializers.zeros, shape, self.param_dtype)
    var = self.param("var", nn.initializers.ones, shape, self.param_dtype)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    gain = f32(scale) * jax.lax.rsqrt(f32(var) + BN_EPS)  # [C]
    return (x.astype(jnp.float32) - f32(mean)) * gain + f32(bias)  # [B, H, W, C]


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's average pool divides by the number of real (unpadded) pixels under the window.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 1, pad: int = 1) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Shared fields of the Inception blocks; `conv(name, ...)` builds a named BasicConv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel=1, stride: int = 1, padding=0) -> BasicConv:
    return BasicConv(features, kernel, stride, padding, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision, name=name)


class InceptionA(_Block):
  """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # [B, 35, 35, 224 + pool_features]


class InceptionB(_Block):
  """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, bd, bp], axis=-1)  # [B, 17, 17, 768]


class InceptionC(_Block):
  """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)  # [B, 17, 17, 768]


class InceptionD(_Block):
  """17 -> 8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, b7, bp], axis=-1)  # [B, 8, 8, 1280]


class InceptionE(_Block):
  """8x8 block (Mixed_7b with an average pool, Mixed_7c with FID's max pool)."""
  pool: str = "avg"  # "avg" (FIDInceptionE_1) or "max" (FIDInceptionE_2)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool_3x3(x) if self.pool == "max" else _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # [B, 8, 8, 2048]


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3: images in [0, 1] -> pool features and 1008-way logits.

  Call with x: float [B, H, W, 3] in [0, 1] (uint8 / 255; see `preprocess`). Returns
    pool:            [B, 2048] float32, the final average pool (FID's features);
    logits:          [B, 1008] float32, fc(pool) with its bias;
    logits_unbiased: [B, 1008] float32, pool @ fc.kernel without the bias (the original Inception
                     Score code and torch-fidelity take the softmax of these).
  With resize_input=False the caller must pass 299x299 images.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # FID is sensitive to small feature errors; TPUs/GPUs otherwise run f32 convs in bf16/TF32.
  precision: Any = jax.lax.Precision.HIGHEST
  resize_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3: input of shape {x.shape}; expected [B, H, W, 3]")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = x.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)  # [B, 299, 299, 3]
    x = (2.0 * x - 1.0).astype(self.dtype)  # [0, 1] -> [-1, 1]
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x)  # [B, 149, 149, 32]
    x = BasicConv(32, 3, name="Conv2d_2a_3x3", **kw)(x)  # [B, 147, 147, 32]
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)  # [B, 147, 147, 64]
    x = _max_pool_3x3(x, stride=2, pad=0)  # [B, 73, 73, 64]
    x = BasicConv(80, 1, name="Conv2d_3b_1x1", **kw)(x)  # [B, 73, 73, 80]
    x = BasicConv(192, 3, name="Conv2d_4a_3x3", **kw)(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3(x, stride=2, pad=0)  # [B, 35, 35, 192]
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)  # [B, 35, 35, 256]
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)  # [B, 35, 35, 288]
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)  # [B, 35, 35, 288]
    x = InceptionB(name="Mixed_6a", **kw)(x)  # [B, 17, 17, 768]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x)  # [B, 17, 17, 768]
    x = InceptionD(name="Mixed_7a", **kw)(x)  # [B, 8, 8, 1280]
    x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)  # [B, 8, 8, 2048]
    x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
    fc = nn.Dense(NUM_LOGITS, dtype=jnp.float32, param_dtype=self.param_dtype,
                  precision=self.precision, name="fc")
    logits = fc(pool)  # [B, 1008]
    kernel = jnp.asarray(fc.variables["params"]["kernel"], jnp.float32)  # [2048, 1008]
    unbiased = jnp.dot(pool, kernel, precision=self.precision)  # [B, 1008]
    return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


def inception_template(dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Any:
  """The parameter tree as ShapeDtypeStructs (nothing allocated); a 75x75 input suffices."""
  model = FIDInceptionV3(dtype=dtype, param_dtype=param_dtype, resize_input=False)
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
