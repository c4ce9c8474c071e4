"""sample.py end to end on a tiny trained text LDM, and every user error it must report cleanly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cli_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, capsys):
  """Runs sample.py's main in-process; returns (exit code, stderr)."""
  code, _, err = cli_util.run_sample(args, capsys)
  return code, err


def test_text_samples_written(tiny_workdirs, tmp_path, capsys):
  out = tmp_path / "out"
  code, err = run_cli(["--checkpoint", tiny_workdirs["ldm"], "--prompt", "a red circle at the center",
                       "--prompt", "a blue square at the top left", "--num_samples", "2",
                       "--steps", "3", "--guidance", "2.0", "--batch_size", "3", "--seed", "7",
                       "--outdir", str(out), "--no_progress"], capsys)
  assert code == 0, err
  files = sorted(os.listdir(out))
  assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png",
                   "samples.json"]
  meta = json.load(open(out / "samples.json"))
  assert [s["prompt"] for s in meta["samples"]] == ["a red circle at the center"] * 2 + [
      "a blue square at the top left"] * 2
  assert [s["seed"] for s in meta["samples"]] == [7, 8, 9, 10]
  assert meta["settings"]["steps"] == 3 and meta["settings"]["guidance"] == 2.0
  img = np.asarray(Image.open(out / "000000.png"))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_seed_fixes_a_sample_whatever_its_batch(tiny_workdirs, tmp_path, capsys):
  """Sample i depends on its own seed only: batch size 1 and 3 give the same image."""
  a, b = tmp_path / "a", tmp_path / "b"
  common = ["--checkpoint", tiny_workdirs["ldm"], "--prompt", "a red circle at the center",
            "--num_samples", "3", "--steps", "2", "--no_progress"]
  assert run_cli(common + ["--batch_size", "1", "--outdir", str(a)], capsys)[0] == 0
  assert run_cli(common + ["--batch_size", "3", "--outdir", str(b)], capsys)[0] == 0
  for name in ("000000.png", "000002.png"):
    x = np.asarray(Image.open(a / name), np.int32)
    y = np.asarray(Image.open(b / name), np.int32)
    assert np.abs(x - y).max() <= 2  # Identical up to batch-dependent float rounding.


@pytest.fixture
def images(tmp_path):
  rgb = np.full((32, 32, 3), 200, np.uint8)
  Image.fromarray(rgb).save(tmp_path / "init.png")
  Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "small_mask.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  return tmp_path


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such file"),
    (["--class_label", "3"], "conditioned by 'ldm_bert', not class labels"),
    (["--prompt", "a red circle", "--height", "60"], "--height=60: expected a positive multiple"),
    (["--prompt", "a red circle", "--steps", "0"], "--steps=0: expected >= 1"),
    (["--prompt", "a red circle", "--steps", "1001"], "--steps=1001"),
    (["--prompt", "a red circle", "--init_image", "{d}/broken.png", "--strength", "0.5"],
     "not a readable image"),
    (["--prompt", "a red circle", "--init_image", "{d}/missing.png", "--strength", "0.5"],
     "no such file"),
    (["--prompt", "a red circle", "--init_image", "{d}/init.png", "--mask", "{d}/small_mask.png"],
     "differs from --init_image"),
    (["--prompt", "a red circle", "--init_image", "{d}/init.png", "--strength", "1.5"],
     "--strength=1.5"),
    ([], "text-conditional model: give --prompt"),
])
def test_user_errors_exit_2_with_one_line(tiny_workdirs, images, tmp_path, capsys, extra, message):
  args = ["--checkpoint", tiny_workdirs["ldm"]] if "--checkpoint" not in extra else []
  args += [a.format(d=images) for a in extra] + ["--outdir", str(tmp_path / "o"), "--steps"
                                                  if "--steps" not in extra else "--eta", "2" if
                                                  "--steps" not in extra else "0"]
  code, err = run_cli(args, capsys)
  assert code == 2
  lines = [l for l in err.strip().splitlines() if l]
  assert len(lines) == 1 and lines[0].startswith("sample.py: error:"), err
  assert message in lines[0], err
  assert "Traceback" not in err


def test_prompt_to_class_model_and_weights_mismatch(tmp_path, capsys):
  """A class model refuses prompts; a config whose shapes differ from its weights is refused."""
  import jax
  from configs import shapes_ldm_text
  from ldm_jax import ldm
  cfg = shapes_ldm_text.get_config("tiny").model
  cfg.cond_stage = dict(kind="class", kwargs=dict(n_classes=19, embed_dim=128))
  model = ldm.LatentDiffusion.init(cfg, jax.random.PRNGKey(0))
  model.save(str(tmp_path / "class_model"))
  code, err = run_cli(["--checkpoint", str(tmp_path / "class_model"), "--prompt", "a red circle",
                       "--outdir", str(tmp_path / "o")], capsys)
  assert code == 2 and "conditioned by 'class', not text" in err
  # Same weights, config claiming more UNet channels: every mismatched tensor must be reported.
  cfg_path = tmp_path / "class_model" / "config.json"
  config = json.load(open(cfg_path))
  config["unet"]["model_channels"] = 96
  json.dump(config, open(cfg_path, "w"))
  code, err = run_cli(["--checkpoint", str(tmp_path / "class_model"), "--class_label", "1",
                       "--outdir", str(tmp_path / "o")], capsys)
  assert code == 2 and "do not match" in err and "shape mismatches" in err, err
  assert len(err.strip().splitlines()) == 1 and f"--checkpoint={tmp_path / 'class_model'}" in err


def test_cli_subprocess_exit_code(tmp_path):
  """The real command line: exit status 2 and a single line, no traceback."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint",
                         str(tmp_path / "nope"), "--prompt", "x", "--outdir", str(tmp_path / "o")],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("sample.py: error: cannot load the model")
  assert "Traceback" not in proc.stderr
