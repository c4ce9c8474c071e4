"""A tiny Flax model and loss for the training-infrastructure tests.

Every kernel has a dimension divisible by 4 and at least 64 elements, so a
mesh with fsdp=4 and min_size=64 shards all of them and replicates the small biases.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MIN_SIZE = 64  # Shard threshold used with this model.


class ToyNet(nn.Module):
  """Conv -> Conv -> mean-pool -> Dense -> Dense; NHWC input [B, 8, 8, 4]."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Conv(16, (3, 3), name='conv1')(x))  # [B, 8, 8, 16]
    h = nn.gelu(nn.Conv(32, (3, 3), name='conv2')(h))  # [B, 8, 8, 32]
    h = h.mean(axis=(1, 2))  # [B, 32]
    h = nn.gelu(nn.Dense(64, name='fc1')(h))  # [B, 64]
    return nn.Dense(4, name='fc2')(h)  # [B, 4]


MODEL = ToyNet()


def init_params(seed=0):
  return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 4)))['params']


def loss_fn(params, batch, rng):
  """MSE plus a small rng-dependent term, so the rng plumbing matters."""
  out = MODEL.apply({'params': params}, batch['x'])  # [B, 4]
  noise = 0.01 * jax.random.normal(rng, out.shape)
  loss = jnp.mean((out + noise - batch['y']) ** 2)
  return loss, {'out_mean': out.mean()}


def deterministic_loss_fn(params, batch, rng):
  del rng
  out = MODEL.apply({'params': params}, batch['x'])
  return jnp.mean((out - batch['y']) ** 2), {}


def make_batch(seed, batch_size=16):
  rs = np.random.RandomState(seed)
  return {'x': rs.normal(size=(batch_size, 8, 8, 4)).astype(np.float32),
          'y': rs.normal(size=(batch_size, 4)).astype(np.float32)}
