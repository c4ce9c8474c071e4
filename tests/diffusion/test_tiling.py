"""Tiled decoding equals the untiled decode and compiles for a fixed, latent-size-free tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.tiling import compile_tile_decoder, tile_starts, tiled_decode

SCALE = 8


def smooth_latent(h, w, b=1, c=4):
  yy, xx = np.meshgrid(np.linspace(0, 3, h), np.linspace(0, 2, w), indexing='ij')
  z = np.stack([np.sin(yy + k) * np.cos(xx - k) for k in range(c)], -1)  # [h, w, c]
  return jnp.asarray(np.broadcast_to(z, (b, h, w, c)) * np.arange(1, b + 1)[:, None, None, None],
                     jnp.float32)


def decoder(z):
  """Identity-like decoder: nearest x8 upsample, then a pointwise map to 3 channels."""
  up = jnp.repeat(jnp.repeat(z, SCALE, axis=1), SCALE, axis=2)  # [B, 8h, 8w, C]
  mix = jnp.asarray(np.linspace(-1, 1, up.shape[-1] * 3).reshape(-1, 3), jnp.float32)
  return jnp.tanh(up @ mix)


def test_tile_starts_cover():
  assert tile_starts(8, 16, 4) == [0]
  assert tile_starts(40, 16, 4) == [0, 12, 24]
  for size, tile, ov in [(40, 16, 4), (33, 8, 3), (64, 16, 8)]:
    starts = tile_starts(size, tile, ov)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - ov for a, b in zip(starts, starts[1:]))
  with pytest.raises(ValueError, match='overlap=8'):
    tile_starts(40, 8, 8)


@pytest.mark.parametrize('h,w,tile,overlap', [(24, 40, 16, 4), (13, 29, 8, 3), (8, 8, 16, 4)])
def test_tiled_equals_untiled(h, w, tile, overlap):
  z = smooth_latent(h, w, b=2)
  shapes = []

  def recording(z_tile):
    shapes.append(z_tile.shape)  # trace time only
    return decoder(z_tile)

  out = tiled_decode(recording, z, tile=tile, overlap=overlap, scale=SCALE)
  assert out.shape == (2, h * SCALE, w * SCALE, 3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(decoder(z)), atol=1e-5)
  assert shapes == [(2, min(tile, h), min(tile, w), 4)]  # one compile, of the tile shape


def test_blending_is_smooth_across_seams():
  """A decoder with a per-tile offset: the linear ramps fade it in instead of cutting."""
  z = smooth_latent(16, 40)

  def biased(z_tile):
    return decoder(z_tile) + 0.1 * jnp.mean(z_tile)  # differs from tile to tile

  ref = np.asarray(decoder(z))
  jump = lambda ov: np.abs(np.diff(
      np.asarray(tiled_decode(biased, z, tile=16, overlap=ov, scale=SCALE)) - ref, axis=2)).max()
  assert jump(0) > 0.01  # hard seams without overlap: the offset steps between tiles
  assert jump(8) < 0.002  # ramps spread the step over 64 pixel columns


def test_tile_memory_does_not_grow():
  mem = {}
  for size in (16, 64):
    c = compile_tile_decoder(decoder, (1, size, size, 4), jnp.float32, 8)
    m = c.memory_analysis()
    mem[size] = (m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes)
  assert mem[16] == mem[64]
  full = jax.jit(decoder).lower(jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)).compile()
  fm = full.memory_analysis()
  assert fm.output_size_in_bytes > 10 * mem[64][2]


def test_bigger_than_trained_latent():
  """A convolutional denoiser samples any latent size; the result then decodes tile by tile."""
  from ldm_jax.diffusion.samplers import sample  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion.schedules import Schedule  # pylint: disable=g-import-not-at-top
  schedule = Schedule.create('linear', 1000, 0.00085, 0.012)
  kernel = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (3, 3, 4, 4)), jnp.float32)

  def conv_denoiser(x, t, cond):
    del t, cond
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return 0.9 * x + jnp.tanh(y)

  x_T = jax.random.normal(jax.random.key(0), (1, 24, 40, 4))
  z = sample(conv_denoiser, schedule, x_T, None, jax.random.key(1), sampler='dpmpp_2m', steps=4)
  assert z.shape == x_T.shape and bool(jnp.all(jnp.isfinite(z)))
  out = tiled_decode(decoder, z, tile=16, overlap=4, scale=SCALE)
  np.testing.assert_allclose(np.asarray(out), np.asarray(decoder(z)), atol=1e-5)
