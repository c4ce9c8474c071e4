"""--lora on the command lines: `python -m ldm_jax.convert` merges into a converted model, sample.py
merges at load time, both the same way; bad files end with one line naming them and exit code 2.

The files address the tiny text LDM's UNet by diffusers (Kohya layout) names; the numerical match
of LoRA files against peft + torch is in test_lora.py.
"""

import os

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

import sample
from ldm_jax import model_io
from ldm_jax.convert import __main__ as convert_main
from ldm_jax.convert import common
from ldm_jax.convert import lora as lora_lib


@pytest.fixture(scope="module")
def lora_file(tiny_workdirs, tmp_path_factory):
  """A Kohya-layout file on every self-attention query of the tiny UNet, random factors."""
  config, params = model_io.load_model(tiny_workdirs["ldm"])
  targets = lora_lib.targets(config)[lora_lib.UNET]
  kernels = common.flatten(params["unet"]["params"])
  names = sorted(m for m in targets
                 if m.endswith("attn1.to_q") and m.startswith(("down_blocks", "up_blocks", "mid")))
  assert names
  rs = np.random.RandomState(0)
  sd = {}
  for name in names:
    width = int(kernels[targets[name][0]].shape[0])  # square: [C, C]
    stem = "lora_unet_" + name.replace(".", "_")
    sd[f"{stem}.lora_down.weight"] = rs.randn(2, width).astype(np.float32)
    sd[f"{stem}.lora_up.weight"] = rs.randn(width, 2).astype(np.float32)
    sd[f"{stem}.alpha"] = np.array(1.0, np.float32)
  path = str(tmp_path_factory.mktemp("lora_cli") / "q.safetensors")
  safetensors.numpy.save_file(sd, path)
  return path


def _sample(capsys, *args):
  try:
    sample.main(["--prompt", "a red circle at the center", "--steps", "2", "--no_progress",
                 *args])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def _image(outdir):
  return np.asarray(Image.open(os.path.join(outdir, "000000.png")), np.int32)


def test_convert_and_sample_merge_the_same_weights(tiny_workdirs, lora_file, tmp_path, capsys):
  ldm = tiny_workdirs["ldm"]
  out = str(tmp_path / "merged")
  assert convert_main.main(["--checkpoint", ldm, "--lora", f"{lora_file}:0.5", "--out", out]) == 0
  config, base = model_io.load_model(ldm)
  _, merged = model_io.load_model(out)
  expected = lora_lib.merge(base, [(lora_lib.read(lora_file, config), 0.5)])
  flat_m, flat_e, flat_b = (common.flatten(t) for t in (merged, expected, base))
  assert flat_m.keys() == flat_e.keys()
  changed = [k for k in flat_e if not np.array_equal(flat_e[k], flat_b[k])]
  assert changed and all(k[0] == "unet" and k[-1] == "kernel" for k in changed)
  for k in flat_e:
    np.testing.assert_array_equal(flat_m[k], flat_e[k])

  plain, with_lora, converted = (str(tmp_path / n) for n in ("plain", "lora", "conv"))
  assert _sample(capsys, "--checkpoint", ldm, "--outdir", plain)[0] == 0
  assert _sample(capsys, "--checkpoint", ldm, "--lora", f"{lora_file}:0.5",
                 "--outdir", with_lora)[0] == 0
  assert _sample(capsys, "--checkpoint", out, "--outdir", converted)[0] == 0
  assert np.abs(_image(with_lora) - _image(converted)).max() <= 1
  assert np.abs(_image(with_lora) - _image(plain)).max() > 8


def test_bad_lora_files_are_one_line_errors(tiny_workdirs, lora_file, tmp_path, capsys):
  ldm = tiny_workdirs["ldm"]
  missing = str(tmp_path / "nope.safetensors")
  code, err = _sample(capsys, "--checkpoint", ldm, "--lora", missing, "--outdir", str(tmp_path))
  assert code == 2 and missing in err and err.count("\n") == 1
  sd = safetensors.numpy.load_file(lora_file)
  sd["lora_unet_no_such_module.lora_down.weight"] = np.zeros((2, 4), np.float32)
  bad = str(tmp_path / "bad.safetensors")
  safetensors.numpy.save_file(sd, bad)
  code, err = _sample(capsys, "--checkpoint", ldm, "--lora", bad, "--outdir", str(tmp_path))
  assert code == 2 and bad in err and "lora_unet_no_such_module.lora_down.weight" in err
  assert err.count("\n") == 1
  out = str(tmp_path / "never")
  assert convert_main.main(["--checkpoint", ldm, "--lora", bad, "--out", out]) == 2
  err = capsys.readouterr().err
  assert "lora_unet_no_such_module.lora_down.weight" in err and not os.path.exists(out)
  assert convert_main.main(["--checkpoint", ldm, "--out", out]) == 2
  assert "give --lora" in capsys.readouterr().err
