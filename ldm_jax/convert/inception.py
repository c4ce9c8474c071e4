"""Import pytorch-fid's FID Inception weights (`pt_inception-*.pth`) and save them as .npz, once.

The file `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release asset: the TF FID graph
ported into torchvision's Inception3 layout, 1008 classes, no aux head) is read through the
project's safe pickle reader, so neither torch nor torchvision is needed. Every tensor must be used
and have the expected shape (`strict_load`); torch's `num_batches_tracked` counters are the only
keys allowed to be left over.

  python -m ldm_jax.convert.inception --pth pt_inception-2015-12-05-6726825d.pth \
      --out fid_inception.npz

Evaluation then calls `load_inception_params("fid_inception.npz")` (a .pth is accepted too and
converted on the fly, which is slower and re-reads the pickle every time).
"""

import argparse
import os
import sys
from typing import Any, Mapping

import numpy as np

from ldm_jax.convert.common import (WeightLoadError, conv_kernel, dense_kernel, flatten, identity,
                                    strict_load)
from ldm_jax.convert.torch_io import CheckpointError, load_state_dict
from ldm_jax.eval.inception import inception_template

MAKE_IT = ("Make it once with: python -m ldm_jax.convert.inception "
           "--pth pt_inception-2015-12-05-6726825d.pth --out <file>.npz")
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
# BatchNorm leaf name in our tree -> torch BatchNorm2d tensor name.
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _key(path: tuple[str, ...]):
  """Flax path -> (torch key, transform). Module names are torchvision's, so this is a rename."""
  *modules, layer, leaf = path
  prefix = ".".join(modules + [layer])
  if layer == "fc":
    return (f"{prefix}.weight", dense_kernel) if leaf == "kernel" else (f"{prefix}.bias", identity)
  if layer == "conv":  # ('Mixed_5b', 'branch1x1', 'conv', 'kernel')
    return f"{prefix}.weight", conv_kernel
  return f"{prefix}.{_BN[leaf]}", identity  # ('...', 'bn', 'scale' | 'bias' | 'mean' | 'var')


def inception_from_torch(state_dict: Mapping[str, Any], what: str = "FID Inception") -> dict:
  """pytorch-fid FID Inception state dict (numpy or CPU torch values) -> Flax params.

  Raises WeightLoadError listing every missing, unexpected or mis-shaped tensor.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  counters = [k for k in sd if k.endswith(".num_batches_tracked")]
  return strict_load(inception_template(), sd, _key, what=what, ignore=counters)


def convert_inception_pth(path: str) -> dict:
  """Reads a pt_inception .pth (safe reader, no torch) and converts it; errors name the file."""
  try:
    state_dict = load_state_dict(path)
  except CheckpointError as e:
    raise WeightLoadError(f"FID Inception weights: {e}") from None
  return inception_from_torch(state_dict, what=f"FID Inception weights {path!r}")


def save_inception_params(params: Mapping[str, Any], path: str) -> None:
  """Writes params as an .npz whose keys are '/'-joined Flax paths."""
  flat = {"/".join(p): np.asarray(v, np.float32) for p, v in flatten(params).items()}
  np.savez(path, **flat)


def load_inception_params(path: str) -> dict:
  """Params from a converted .npz (checked leaf by leaf) or, slower, straight from a .pth."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights file {path!r} does not exist. {MAKE_IT}")
  if path.lower().endswith(_TORCH_SUFFIXES):
    return convert_inception_pth(path)
  try:
    with np.load(path) as data:
      flat = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise WeightLoadError(f"FID Inception weights file {path!r} is not a readable .npz ({e}); "
                          f"expected the output of the converter. {MAKE_IT}") from None
  return strict_load(inception_template(), flat, lambda p: ("/".join(p), identity),
                     what=f"FID Inception weights file {path!r}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pth", required=True,
                      help="pytorch-fid weights, pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    print(f"--out: {args.out!r} must end with .npz (np.savez would append it).", file=sys.stderr)
    return 2
  if not os.path.isfile(args.pth):
    print(f"--pth: file {args.pth!r} does not exist.", file=sys.stderr)
    return 2
  try:
    params = convert_inception_pth(args.pth)
  except WeightLoadError as e:
    print(f"python -m ldm_jax.convert.inception: error: {e}", file=sys.stderr)
    return 2
  save_inception_params(params, args.out)
  count = sum(int(np.prod(v.shape)) for v in flatten(params).values())
  print(f"wrote {args.out}: FID Inception-v3, {count:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
