"""Tiled decoding: decode a large latent in overlapping fixed-size tiles blended with linear ramps.

The decoder is compiled once for the tile shape, so device memory is bounded by the tile, not by the
latent; only the blended output image is accumulated on the host. Sampling bigger than the training
resolution needs nothing special (the UNet is convolutional): sample on a larger latent, then
decode it here when the full-size decode would not fit.
"""

from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
  """Start offsets of tiles of length min(tile, size) covering [0, size) with >= overlap overlap."""
  if tile < 1 or not 0 <= overlap < tile:
    raise ValueError(f'tile={tile!r}, overlap={overlap!r}: expected tile >= 1 and '
                     f'0 <= overlap < tile')
  if size <= tile:
    return [0]
  starts = list(range(0, size - tile, tile - overlap))
  return starts + [size - tile]


def tile_shape(z_shape: Tuple[int, ...], tile: int) -> Tuple[int, ...]:
  """The fixed latent tile shape [B, th, tw, C] the decoder is compiled for."""
  b, h, w, c = z_shape
  return (b, min(tile, h), min(tile, w), c)


def _ramp(length: int, ramp: int, left: bool, right: bool) -> np.ndarray:
  """1-D blend weights [length]: linear ramps of `ramp` pixels on sides that meet another tile."""
  w = np.ones(length, np.float32)
  if ramp > 0:
    up = (np.arange(length, dtype=np.float32) + 0.5) / ramp
    if left:
      w = np.minimum(w, up)
    if right:
      w = np.minimum(w, up[::-1])
  return w


def compile_tile_decoder(decode_fn: Callable, z_shape, dtype, tile: int, aux: Any = None):
  """Lowers and compiles decode_fn for the tile shape of a latent of z_shape (see `tile_shape`)."""
  spec = jax.ShapeDtypeStruct(tile_shape(tuple(z_shape), tile), dtype)
  if aux is None:
    return jax.jit(decode_fn).lower(spec).compile()
  return jax.jit(decode_fn).lower(spec, aux).compile()


def tiled_decode(decode_fn: Callable, z: jnp.ndarray, *, tile: int = 32, overlap: int = 8,
                 scale: int = 8, aux: Optional[Any] = None) -> jnp.ndarray:
  """Decodes z [B, h, w, C] -> [B, h*scale, w*scale, C_out] tile by tile.

  decode_fn(z_tile) (or decode_fn(z_tile, aux), e.g. with the decoder parameters as aux so they are
  not baked into the compiled code) must map [B, th, tw, C] to [B, th*scale, tw*scale, C_out].
  tile and overlap are in latent pixels; overlapping outputs are averaged with linear ramps of
  overlap*scale pixels, so seams fade instead of cutting.
  """
  if z.ndim != 4:
    raise ValueError(f'z shape {z.shape}: expected [B, h, w, C]')
  b, h, w, _ = z.shape
  compiled = compile_tile_decoder(decode_fn, z.shape, z.dtype, tile, aux)
  th, tw = tile_shape(z.shape, tile)[1:3]
  ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
  ramp = overlap * scale
  out, weight = None, np.zeros((1, h * scale, w * scale, 1), np.float32)
  for y in ys:
    wy = _ramp(th * scale, ramp, y > 0, y + th < h)
    for x in xs:
      wx = _ramp(tw * scale, ramp, x > 0, x + tw < w)
      z_tile = jax.lax.dynamic_slice(z, (0, y, x, 0), (b, th, tw, z.shape[3]))  # [B, th, tw, C]
      dec = np.asarray(compiled(z_tile) if aux is None else compiled(z_tile, aux), np.float32)
      if dec.shape[1:3] != (th * scale, tw * scale):
        raise ValueError(f'decode_fn output shape {dec.shape}: expected spatial size '
                         f'{(th * scale, tw * scale)} for a tile of {(th, tw)} with scale={scale}')
      if out is None:
        out = np.zeros((b, h * scale, w * scale, dec.shape[3]), np.float32)
      w2 = (wy[:, None] * wx[None, :])[None, :, :, None]  # [1, th*s, tw*s, 1]
      sl = (slice(None), slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
      out[sl] += dec * w2
      weight[sl] += w2
  return jnp.asarray(out / weight)
