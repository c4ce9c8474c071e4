"""Command line: encode a dataset with a trained model's first stage into a latent cache.

    python -m ldm_jax.cli.latent_cache --checkpoint workdirs/shapes_ldm --data shapes \
        --out_dir caches/shapes

The cache format and `build_latent_cache` live in `ldm_jax.data.latent_cache`, which takes the
encoder as a function; this module is the floor above that loads the model to get one.
"""

import argparse
import sys

from ldm_jax import ldm as ldm_lib
from ldm_jax.data import latent_cache
from ldm_jax.data import loader
from ldm_jax.data import sources
from ldm_jax.data import transforms

# A cache is built from images: the sources whose records hold them.
IMAGE_SOURCES = [name for name, kind in sources.SOURCES.items() if kind.yields == sources.IMAGES]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m ldm_jax.cli.latent_cache",
      description="Encode a dataset with a trained autoencoder into a sharded latent cache.")
  p.add_argument("--checkpoint", required=True,
                 help="model checkpoint; its `encode` maps images in [-1, 1] to latents")
  p.add_argument("--out_dir", required=True, help="output directory (must not hold a cache)")
  p.add_argument("--data", default="shapes", choices=IMAGE_SOURCES,
                 help="source name, as config.data.source")
  p.add_argument("--root", default="", help="image folder root (--data folder)")
  p.add_argument("--caption_source", default=None, choices=["txt", "jsonl"],
                 help="folder captions")
  p.add_argument("--tfds_name", default="", help="TFDS dataset name (--data tfds)")
  p.add_argument("--split", default="train", help="TFDS split")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir")
  p.add_argument("--size", type=int, default=256, help="image size (resize + center crop)")
  p.add_argument("--length", type=int, default=10_000, help="shapes: number of examples")
  p.add_argument("--batch_size", type=int, default=32, help="encode batch size")
  p.add_argument("--shard_size", type=int, default=1024, help="examples per shard")
  p.add_argument("--max_examples", type=int, default=None, help="stop after this many")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  source = loader.make_dataset(name=args.data, size=args.size, length=args.length,
                               root=args.root, caption_source=args.caption_source,
                               tfds_name=args.tfds_name, split=args.split,
                               data_dir=args.data_dir)
  it = loader.make_loader(source, batch_size=args.batch_size, seed=0, shuffle=False, num_epochs=1,
                          process_index=0, process_count=1, drop_remainder=False,
                          transform=transforms.ImageTransform(args.size))
  try:
    model = ldm_lib.LatentDiffusion.from_checkpoint(args.checkpoint)
  except (OSError, ValueError) as e:  # A missing or unreadable model: one line, no traceback.
    print(f"latent_cache: error: --checkpoint {args.checkpoint!r}: {e}", file=sys.stderr)
    sys.exit(2)
  index = latent_cache.build_latent_cache(it, model.encode, args.out_dir, args.shard_size,
                                          max_examples=args.max_examples)
  print(f"wrote {index['num_examples']} latents of shape {index['latent_shape']} in "
        f"{len(index['shards'])} shards to {args.out_dir}")


if __name__ == "__main__":
  main()
