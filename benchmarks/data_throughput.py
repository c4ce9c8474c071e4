"""Input pipeline throughput: images/s of the shapes dataset through the Grain loader.

    python benchmarks/data_throughput.py [--batches 30] [--workers 2] [--batch_size 32]

Measures steady-state batches after a warm-up (worker start-up is excluded and printed apart) at
64 px and 256 px, with the standard training transform (random flip, [-1, 1] floats), and prints a
table. Rendering is pure numpy, so this is also a fair proxy for CPU-bound decoding of real images.
"""

import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm_jax.data import loader  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_jax.data import shapes  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldm_jax.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position


def measure(size: int, workers: int, batch_size: int, batches: int, warmup: int = 3) -> dict:
  """Images/s over `batches` batches after `warmup` batches; also the time to the first batch."""
  src = shapes.ShapesSource(seed=0, size=size, length=100_000)
  start = time.perf_counter()
  it = loader.make_loader(src, batch_size=batch_size, seed=0, worker_count=workers,
                          process_index=0, process_count=1,
                          transform=transforms.ImageTransform(size, flip=True))
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  it.close()
  assert batch["image"].shape == (batch_size, size, size, 3)
  return {"size": size, "workers": workers, "first_batch_s": first,
          "images_per_s": batches * batch_size / elapsed}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
  p.add_argument("--workers", type=int, default=2, help="worker processes")
  p.add_argument("--batch_size", type=int, default=32, help="images per batch")
  p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes")
  args = p.parse_args(argv)
  rows = [measure(s, args.workers, args.batch_size, args.batches) for s in args.sizes]
  print(f"{'size':>6} {'workers':>8} {'batch':>6} {'first batch (s)':>16} {'images/s':>10}")
  for r in rows:
    print(f"{r['size']:>6} {r['workers']:>8} {args.batch_size:>6} {r['first_batch_s']:>16.2f} "
          f"{r['images_per_s']:>10.1f}")


if __name__ == "__main__":
  main()
