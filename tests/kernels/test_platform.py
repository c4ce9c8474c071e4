"""Kernels choose their implementation by the platform a computation is compiled for.

Each program is compiled twice from this CPU host: for the host's CPU and, through libtpu's
compiler, for a TPU v5e topology (nothing runs on a TPU). The CPU program must hold the CPU
forms (attention's block loops, the phased upsample conv), the TPU program none of them, whatever
`jax.default_backend()` says (here always "cpu").
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ldm_jax import kernels
from ldm_jax.kernels import flash_attention, platform, upsample


def _compiled_text(fn, args, device=None):
  """HLO text of fn compiled for `device` (None: the default CPU device)."""
  if device is not None:
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))
            for a in args]
  return jax.jit(fn).lower(*args).compile().as_text()


def test_by_platform_picks_the_branch_of_the_target(tpu_v5e_devices):
  fn = lambda x: platform.by_platform(x, cpu=lambda x: x + 1.0, default=lambda x: x * 3.0)
  x = jnp.ones((8, 128), jnp.float32)
  assert float(jax.jit(fn)(x)[0, 0]) == 2.0  # runs on the CPU: the cpu branch
  tpu = _compiled_text(fn, [x], tpu_v5e_devices[0])
  assert "multiply" in tpu and " add(" not in tpu


def test_attention_blocks_on_cpu_only(tpu_v5e_devices):
  """Logits past CPU_ATTENTION_UNBLOCKED: the CPU program loops over blocks (forward and
  backward), the TPU program is loop-free; both are the same function."""
  b, length, heads, d = 2, 2048, 2, 8  # 16 M logits
  assert b * heads * length * length > flash_attention.CPU_ATTENTION_UNBLOCKED
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(b, length, heads, d), jnp.float32) for _ in range(3))
  loss = lambda q, k, v: jnp.sum(jnp.sin(kernels.attention(q, k, v)))
  grad = jax.grad(loss, argnums=(0, 1, 2))
  assert "while" in _compiled_text(grad, [q, k, v])
  tpu = _compiled_text(grad, [q, k, v], tpu_v5e_devices[0])
  assert "while" not in tpu


def test_upsample_conv_is_phased_on_cpu_only(tpu_v5e_devices):
  """The phased form's 2x2 convolution appears only in the CPU program."""
  x = jnp.ones((1, 32, 32, 8), jnp.float32)
  kernel = jnp.ones((3, 3, 8, 8), jnp.float32)
  assert 32 * 32 >= upsample.CPU_PHASED_UPSAMPLE_MIN
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fn = lambda x, k: kernels.upsample_conv(x, k, conv, padded_3x3=True)
  lowered = lambda device: jax.jit(fn).lower(
      *[jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))
        for a in (x, kernel)]).as_text()
  phased_kernel = "tensor<2x2x8x32xf32>"  # 2x2 taps, 4 phases x 8 features
  assert phased_kernel in lowered(jax.devices("cpu")[0])
  assert phased_kernel not in lowered(tpu_v5e_devices[0])
