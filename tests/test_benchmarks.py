"""benchmarks/unet_kernels.py: it must find every convolution and attention the UNet runs, and time
the same function on both sides (checked against the torch model and torch's ops)."""

import collections
import json
import os

import pytest
import torch

from benchmark_util import ROOT, load_benchmark


@pytest.fixture(scope="module")
def kernels():
  return load_benchmark("unet_kernels")


def test_recorded_kernels_match_the_torch_unet(kernels):
  from diffusers import UNet2DConditionModel
  from diffusers.models.attention_processor import Attention
  import peer_models as pm  # on sys.path once unet_kernels.py is loaded
  shapes = kernels.record_shapes(batch=2)
  torch_unet = UNet2DConditionModel(**pm.UNET_CONFIG)
  # Each torch Conv2d runs once per forward pass: the multisets of (kh, kw, in, out) must agree,
  # except the transformers' 1x1 proj_in / proj_out, which ldm_jax applies as dense layers.
  convs = [(name, m) for name, m in torch_unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
  projections = collections.Counter((m.in_channels, m.out_channels) for name, m in convs
                                    if name.split(".")[-1] in ("proj_in", "proj_out"))
  want = collections.Counter((m.kernel_size[0], m.kernel_size[1], m.in_channels, m.out_channels)
                             for name, m in convs if name.split(".")[-1] not in ("proj_in", "proj_out"))
  got, dense = collections.Counter(), collections.Counter()
  for key, n in shapes.items():
    if key[0] == "conv":
      got[key[2]] += n
    elif key[0] == "dense":
      dense[key[2]] += n
  assert got == want
  assert sum(projections.values()) == 32
  assert all(dense[c] >= n for c, n in projections.items())  # with q, k, v, out of the same width
  n_attention = sum(isinstance(m, Attention) for m in torch_unet.modules())
  assert sum(n for key, n in shapes.items() if key[0] == "attention") == n_attention == 32
  assert {key[1][0] for key in shapes if key[0] != "conv"} == {2}  # dense and attention: batch 2


@pytest.mark.parametrize("key", [
    ("conv", (1, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1))),
    ("conv", (1, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1))),  # Downsample's padding
    ("attention", (1, 16, 2, 8), (1, 5, 2, 8)),
    ("dense", (1, 3, 8), (8, 4)),
])
def test_time_shape_runs_the_same_function_in_both(kernels, key):
  from jax import lax
  if key[0] == "conv":
    key = key + (lax.conv_dimension_numbers(key[1], key[2], ("NHWC", "HWIO", "NHWC")),)
  row = kernels.time_shape(key, repeats=1)  # raises if ldm_jax and torch disagree
  assert row["error"] < 1e-5
  assert all(row[k] > 0 for k in ("jax_fwd", "torch_fwd", "jax_both", "torch_both"))


def test_full_size_config_table_in_the_docs_is_rendered_from_its_results():
  """docs/scaling.md's full-size sweep section is what `aot_all_configs.py --table` renders from the
  committed JSON (so a new row cannot land without its table), each figure read from the row."""
  sweep = load_benchmark("aot_all_configs")
  path = os.path.join(ROOT, "benchmarks", "results", "aot", "all_configs_full_compiled.json")
  with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
    assert sweep.table_block(path) in f.read()
  with open(path) as f:
    report = json.load(f)
  row = report["rows"][0]
  step = row["programs"]["train_step"]
  line = next(l for l in sweep.table_lines(report) if l.startswith(f"| {row['config']} |"))
  assert f"{step['used_bytes'] / 2 ** 30:.2f}, {step['flops']:.2e}" in line
  failed = dict(row, status="FAILED: XlaRuntimeError: boom")
  line = sweep.table_lines(dict(report, rows=[failed]))[-1]
  assert "FAILED: XlaRuntimeError: boom" in line
  assert f"{step['used_bytes'] / 2 ** 30:.2f}" not in line
