"""sample.py's image modes on tiny trained models, judged by the images: img2img stays near its
input as strength falls, inpainting keeps the known region, a class label changes the sample."""

import numpy as np
from PIL import Image

import cli_util
from configs import shapes_ldm_class
from ldm_jax.cli import train as entry


def _run(args, outdir, capsys):
  code, _, err = cli_util.run_sample(args + ["--steps", "4", "--seed", "5", "--outdir", str(outdir),
                                             "--no_progress"], capsys)
  assert code == 0, err
  return np.asarray(Image.open(outdir / "000000.png"), np.int32)


def _init_image(tmp_path):
  rng = np.random.default_rng(0)
  img = np.full((32, 32, 3), 230, np.uint8)
  img[8:24, 8:24] = (200, 30, 30)            # A red square on a light background.
  img = np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
  Image.fromarray(img).save(tmp_path / "init.png")
  return img.astype(np.int32)


def test_img2img_strength_sets_how_far_the_sample_moves(tiny_workdirs, tmp_path, capsys):
  init = _init_image(tmp_path)
  base = ["--checkpoint", tiny_workdirs["ldm"], "--prompt", "a red square at the center",
          "--init_image", str(tmp_path / "init.png")]
  weak = _run(base + ["--strength", "0.25"], tmp_path / "weak", capsys)
  strong = _run(base + ["--strength", "1.0"], tmp_path / "strong", capsys)
  assert weak.shape == init.shape
  assert np.abs(weak - init).mean() < np.abs(strong - init).mean()


def test_inpainting_keeps_the_known_region(tiny_workdirs, tmp_path, capsys):
  init = _init_image(tmp_path)
  keep = np.full((32, 32), 255, np.uint8)
  keep[:, 16:] = 0                           # Repaint the right half.
  Image.fromarray(keep).save(tmp_path / "keep.png")
  out = _run(["--checkpoint", tiny_workdirs["ldm"], "--prompt", "a blue circle at the right",
              "--init_image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "keep.png")],
             tmp_path / "inpaint", capsys)
  assert np.abs(out[:, :16] - init[:, :16]).max() <= 1  # Kept: the input's pixels (rounding).
  assert np.abs(out[:, 16:] - init[:, 16:]).mean() > 5   # Repainted.


def test_class_label_changes_the_sample(tiny_workdirs, tmp_path, capsys):
  cfg = shapes_ldm_class.get_config("tiny")
  cfg.mesh.num_devices = 1
  cfg.first_stage_checkpoint = tiny_workdirs["ae"]
  entry.train(cfg, str(tmp_path / "class_ldm"))
  base = ["--checkpoint", str(tmp_path / "class_ldm"), "--guidance", "3.0"]
  a = _run(base + ["--class_label", "1"], tmp_path / "a", capsys)
  b = _run(base + ["--class_label", "7"], tmp_path / "b", capsys)
  again = _run(base + ["--class_label", "1"], tmp_path / "again", capsys)
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, again)      # Same label and seed: the same image.
  assert np.abs(a - b).mean() > 0.5            # Another label: another image.
