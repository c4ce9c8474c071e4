"""Example sweep over the shapes autoencoder: 2 learning rates x 2 (batch size, seed) pairs = 4 runs.

  python sweep.py --config configs/shapes_autoencoder.py:tiny \
      --sweep configs/sweeps/shapes_tiny.py --workdir /tmp/sw [--mode print]

Run names come from the overrides, e.g. `bs=2,seed=0,lr=6.25e-05`.
"""

from ldm_jax.sweep import product
from ldm_jax.sweep import zip_


def get_sweep():
  # (batch size, seed) vary together; each pair is crossed with both rates. Stage 1's Adam rate
  # is base_learning_rate x global batch (the CompVis convention), so bs=4 doubles it.
  return product(zip_(**{"data.batch_size": [2, 4], "seed": [0, 1]}),
                 **{"loss.base_learning_rate": [6.25e-5, 1.25e-4]})
