"""Nearest-neighbour x2 upsampling followed by a convolution; a phase-split form for CPU."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import platform

# On CPU, a 3x3 conv of a nearest-x2 upsampled input of at least this many positions runs as
# `upsample_conv3x3`; below it the extra interleave costs more than the FLOPs it saves
# (measurements in benchmarks/README.md).
CPU_PHASED_UPSAMPLE_MIN = 32 * 32

# Each output phase a of nearest-x2-then-3x3 sees the input rows (i - 1 + a, i + a) through the
# kernel rows summed as below: phase 0 gets (k0, k1 + k2), phase 1 gets (k0 + k1, k2).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)  # [a, tap, k]


def nearest_x2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2 x 2 (torch's 'nearest' x2)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv3x3(nearest_x2(x)) with padding 1 and no bias, in 2.25x fewer FLOPs.

  Output pixel (2i + a, 2j + b) of the upsampled conv only ever sees 2 x 2 distinct input
  pixels, so each of the four phases (a, b) is a 2x2 conv of x with kernel taps summed
  (`_PHASE_TAPS`). All four run as one 2x2 VALID conv of the 1-padded input with 4F output
  channels; phase (a, b) is its output shifted by (a, b), and the phases are interleaved back.
  Exact up to the summation order (tests/models/test_layers_fast_paths.py).

  Args:
    x: [B, H, W, C]; kernel: [3, 3, C, F].
  Returns:
    [B, 2H, 2W, F].
  """
  b, h, w, c = x.shape
  f = kernel.shape[-1]
  taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
  phase_kernel = jnp.einsum("aru,bsv,uvcf->rscabf", taps, taps, kernel).reshape(2, 2, c, 4 * f)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H+2, W+2, C]
  out = jax.lax.conv_general_dilated(xp, phase_kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out = out.reshape(b, h + 1, w + 1, 2, 2, f)  # [B, H+1, W+1, a, b, F]
  rows = [jnp.stack([out[:, a:a + h, s:s + w, a, s] for s in range(2)], axis=3)
          for a in range(2)]  # a: [B, H, W, 2 (b), F]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, f)  # [B, H, a, W, b, F] -> [B, 2H, 2W, F]


def upsample_conv(x: jax.Array, kernel: jax.Array, conv: Callable[[jax.Array, jax.Array], jax.Array],
                  *, padded_3x3: bool) -> jax.Array:
  """conv(nearest_x2(x), kernel): the Upsample block's convolution.

  `padded_3x3` says that conv is a 3x3, stride-1 convolution with padding 1 and no bias; then,
  on CPU and for inputs of at least CPU_PHASED_UPSAMPLE_MIN positions, `upsample_conv3x3`
  computes it (XLA:CPU's convolutions are the bottleneck there; accelerators keep the plain form).

  Args:
    x: [B, H, W, C]; kernel: [kh, kw, C, F].
  Returns:
    [B, 2H', 2W', F] as conv returns it.
  """
  plain = lambda x, kernel: conv(nearest_x2(x), kernel)
  if not padded_3x3 or x.shape[1] * x.shape[2] < CPU_PHASED_UPSAMPLE_MIN:
    return plain(x, kernel)
  return platform.by_platform(x, kernel, cpu=upsample_conv3x3, default=plain)
