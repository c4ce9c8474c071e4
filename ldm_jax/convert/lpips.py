"""Import LPIPS(vgg) weights from torch files, and the .npz file the autoencoder training loads.

Two torch sources make up the metric:
  * the VGG16 trunk, torchvision's `vgg16().features` state dict (`0.weight`, `0.bias`, `2.weight`,
    ...). The full torchvision checkpoint (`vgg16-397923af.pth`, keys `features.N.*` and
    `classifier.*`) is accepted as well: its `features.` part is used, the classifier ignored.
  * the linear heads of the `lpips` package, `weights/v0.1/vgg.pth` inside its wheel
    (`lin0.model.1.weight` ... `lin4.model.1.weight`, each [1, C, 1, 1]). taming-transformers and
    CompVis ldm download the same heads as `vgg.pth`.

Make the file once, offline, from local copies:

  python -m ldm_jax.convert.lpips --vgg vgg16-397923af.pth \
      --lin .venv/lib/python3.11/site-packages/lpips/weights/v0.1/vgg.pth --out lpips_vgg.npz

Training then calls `load_lpips_params("lpips_vgg.npz")`, which checks every tensor against the
model's template.
"""

import argparse
import os
import sys
from typing import Any, Mapping

import numpy as np

from ldm_jax.convert.common import (WeightLoadError, conv_kernel, dense_kernel, flatten, identity,
                                    strict_load, strip_prefix)
from ldm_jax.models.lpips import LPIPS, lpips_template

MAKE_IT = ("Make it once with: python -m ldm_jax.convert.lpips --vgg <torchvision vgg16 .pth> "
           "--lin <lpips package>/weights/v0.1/vgg.pth --out <file>.npz")


def _vgg_features(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`features` keys of either a `vgg16().features` or a whole `vgg16()` state dict."""
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  if any(k.startswith("features.") for k in sd):
    # A whole torchvision VGG16: the classifier is not part of LPIPS.
    sd = strip_prefix(sd, "features.")
  return {f"vgg.{k}": v for k, v in sd.items()}


def _key(path: tuple[str, ...]):
  """Flax path in the LPIPS template -> (torch key, transform)."""
  if path[0] == "net":  # ("net", "features_{i}", "kernel" | "bias")
    index = path[1].split("_")[1]
    if path[2] == "kernel":
      return f"vgg.{index}.weight", conv_kernel
    return f"vgg.{index}.bias", identity
  # ("lin{k}", "kernel"): lpips.NetLinLayer keeps its conv at `model.1` (after the Dropout).
  return f"{path[0]}.model.1.weight", dense_kernel


def lpips_from_torch(vgg_features_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any],
                     model: LPIPS | None = None) -> dict[str, Any]:
  """Builds LPIPS Flax params from the two torch state dicts (values: numpy or torch on CPU).

  Raises WeightLoadError listing every missing, unexpected or mis-shaped tensor.
  """
  model = model or LPIPS()
  template = lpips_template(model.dtype, model.param_dtype)
  lin = {k: np.asarray(v) for k, v in lin_state_dict.items()}
  state_dict = {**_vgg_features(vgg_features_state_dict), **lin}
  # A whole lpips.LPIPS state dict also works as the heads file: its `lins.k` entries repeat
  # `lin{k}` (a ModuleList over the same modules), its scaling layer holds our constants and its
  # trunk `net.slice*` is taken from --vgg.
  return strict_load(template, state_dict, _key, what="LPIPS(vgg)",
                     ignore_prefixes=("lins.", "scaling_layer.", "net.slice"))


def save_lpips_params(params: Mapping[str, Any], path: str) -> None:
  """Writes params as an .npz whose keys are '/'-joined Flax paths."""
  flat = {"/".join(p): np.asarray(v) for p, v in flatten(params).items()}
  np.savez(path, **flat)


def load_lpips_params(path: str) -> dict[str, Any]:
  """Loads an .npz written by this module, checked tensor by tensor against the LPIPS template."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LPIPS weights file {path!r} does not exist. {MAKE_IT}")
  with np.load(path) as data:
    flat = {k: data[k] for k in data.files}
  return strict_load(lpips_template(), flat, lambda p: ("/".join(p), identity),
                     what=f"LPIPS weights file {path!r}")


def _read_torch(path: str, flag: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise SystemExit(f"{flag}: file {path!r} does not exist.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise SystemExit(f"{flag}: {path!r} holds a {type(sd).__name__}; expected a state dict.")
  return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vgg", required=True,
                      help="torchvision VGG16 weights, .pth or .safetensors (whole model or "
                      ".features)")
  parser.add_argument("--lin", required=True,
                      help="lpips heads, e.g. <lpips package>/weights/v0.1/vgg.pth")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    raise SystemExit(f"--out: {args.out!r} must end with .npz (np.savez would append it).")
  try:
    params = lpips_from_torch(_read_torch(args.vgg, "--vgg"), _read_torch(args.lin, "--lin"))
  except WeightLoadError as e:
    raise SystemExit(str(e)) from None
  save_lpips_params(params, args.out)
  count = sum(int(np.prod(v.shape)) for v in flatten(params).values())
  print(f"wrote {args.out}: LPIPS(vgg), {count:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
