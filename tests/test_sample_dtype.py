"""sample.py --dtype bfloat16 on a tiny trained text LDM: it runs, computes in bf16, and stays close to fp32."""

import json

import numpy as np
from PIL import Image

import cli_util


def _sample(workdir, outdir, dtype, capsys):
  code, _, err = cli_util.run_sample(
      ["--checkpoint", workdir, "--prompt", "a red circle at the center", "--num_samples", "2",
       "--steps", "3", "--guidance", "2.0", "--seed", "3", "--dtype", dtype, "--outdir", str(outdir),
       "--no_progress"], capsys)
  assert code == 0, err
  images = np.stack([np.asarray(Image.open(outdir / f"00000{i}.png"), np.int32) for i in range(2)])
  return images, json.load(open(outdir / "samples.json"))


def test_bfloat16_sampling_is_close_to_float32_but_not_identical(tiny_workdirs, tmp_path, capsys):
  f32, _ = _sample(tiny_workdirs["ldm"], tmp_path / "f32", "float32", capsys)
  bf16, meta = _sample(tiny_workdirs["ldm"], tmp_path / "bf16", "bfloat16", capsys)
  assert bf16.shape == f32.shape == (2, 32, 32, 3)
  diff = np.abs(bf16 - f32)
  # bf16 keeps 8 mantissa bits: the images differ (so the flag reached the networks) ...
  assert diff.max() > 0
  # ... but only by rounding, not by a different sample: a few grey levels on average.
  assert diff.mean() < 4.0, diff.mean()
  # The two samples of one run still differ from each other (their seeds differ).
  assert np.abs(bf16[0] - bf16[1]).mean() > 4 * diff.mean()
  assert [s["seed"] for s in meta["samples"]] == [3, 4]
