"""sample.py's exit-2 promise on hostile input: every mistake is one stderr line naming the flag or
file, exit code 2, and nothing is computed or written.

Flag checks run before any model is loaded, so most cases point --checkpoint at a path that does not
exist: an error about the flag (not "cannot load the model") proves the check came first.
"""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import cli_util
import sample
from ldm_jax.cli import common as sample_cli
from ldm_jax.cli import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, capsys):
  """sample.py's main in-process: (exit code, the non-empty stderr lines)."""
  code, _, err = cli_util.run_sample(args, capsys)
  return code, [line for line in err.splitlines() if line.strip()]


def assert_refused(code, lines, *needles):
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith("sample.py: error:"), lines
  for needle in needles:
    assert needle in lines[0], lines


def _png_header(path, width, height):
  """A PNG whose header claims width x height (a decompression bomb) with almost no data."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  path.write_bytes(b"\x89PNG\r\n\x1a\n"
                   + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("hostile")
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(d / "init.png")
  _png_header(d / "bomb.png", 20000, 20000)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "tiff_inside.png", format="TIFF")
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "anim.gif")
  (d / "latin1.txt").write_bytes("a red circle\ncaf\u00e9 au lait\n".encode("latin-1"))
  return d


NO_MODEL = ["--checkpoint", "/nonexistent/model", "--prompt", "a red circle"]


@pytest.mark.parametrize("extra, needles", [
    # Non-finite numbers: refused by the parser.
    (["--guidance", "nan"], ["argument --guidance", "'nan'", "finite"]),
    (["--guidance", "inf"], ["argument --guidance", "'inf'", "finite"]),
    (["--eta", "nan"], ["argument --eta", "finite"]),
    (["--guidance_rescale", "nan"], ["argument --guidance_rescale", "finite"]),
    (["--strength=-inf", "--init_image", "{d}/init.png"], ["argument --strength", "finite"]),
    # Ranges and combinations.
    (["--strength", "0.01", "--steps", "50", "--init_image", "{d}/init.png"],
     ["--strength=0.01 with --steps=50 runs no denoising step", ">= 0.02"]),
    (["--eta", "-5"], ["--eta=-5.0: expected >= 0"]),
    (["--eta", "0.5", "--sampler", "plms"], ["--eta=0.5 with --sampler=plms", "DDIM"]),
    (["--guidance", "-1"], ["--guidance=-1.0: expected >= 0"]),
    (["--guidance_rescale", "1.5"], ["--guidance_rescale=1.5: expected 0 <= rescale <= 1"]),
    (["--seed", "18446744073709551616"], ["--seed=18446744073709551616", "<= 4294967295"]),
    (["--seed", "-1"], ["--seed=-1"]),
    (["--seed", "4294967295", "--num_samples", "2"], ["--seed=4294967295", "<= 4294967294"]),
    (["--height", "0"], ["--height=0: expected a positive"]),
    (["--width", "-32"], ["--width=-32: expected a positive"]),
    (["--steps", "0"], ["--steps=0: expected >= 1"]),
    (["--mask", "{d}/init.png"], ["--mask needs --init_image"]),
    # Hostile files.
    (["--init_image", "{d}/bomb.png"], ["--init_image={d}/bomb.png", "max_pixels"]),
    (["--init_image", "{d}/init.png", "--mask", "{d}/bomb.png"], ["--mask={d}/bomb.png",
                                                                   "max_pixels"]),
    (["--lowres", "{d}/bomb.png"], ["--lowres={d}/bomb.png", "max_pixels"]),
    (["--init_image", "{d}/tiff_inside.png"], ["--init_image={d}/tiff_inside.png",
                                               "not a readable PNG file"]),
    (["--lowres", "{d}/anim.gif"], ["--lowres={d}/anim.gif", "extension '.gif'"]),
    (["--prompt_file", "{d}/latin1.txt"], ["--prompt_file={d}/latin1.txt",
                                           "not UTF-8 text (byte 0xe9 on line 2)"]),
    (["--prompt", "caf\udce9"], ["--prompt='caf\\\\xe9': not UTF-8 text (byte 0xe9"]),
])
def test_flag_mistakes_refused_before_loading(files, tmp_path, capsys, extra, needles):
  out = tmp_path / "out"
  code, lines = run_cli(NO_MODEL + [a.format(d=files) for a in extra] + ["--outdir", str(out)],
                        capsys)
  assert_refused(code, lines, *[n.format(d=files) for n in needles])
  assert not out.exists()  # Nothing computed, nothing written.


def test_non_utf8_argv_bytes_in_a_real_process(tmp_path):
  """The operating system hands Python raw bytes: a Latin-1 prompt is one line and exit code 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([os.fsencode(sys.executable), os.path.join(ROOT, "sample.py").encode(),
                         b"--checkpoint", b"/nonexistent", b"--prompt", b"caf\xe9",
                         b"--outdir", str(tmp_path / "o").encode()],
                        capture_output=True, cwd=ROOT, env=env, timeout=120)
  err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, err
  assert err[0].startswith("sample.py: error: --prompt=") and "not UTF-8" in err[0], err


def test_prompt_file_utf8_with_bom_is_read(files, tmp_path):
  path = tmp_path / "bom.txt"
  path.write_bytes("\ufeffcaf\u00e9\n\n  second  \n".encode("utf-8"))
  args = sample.parse_args(NO_MODEL[:2] + ["--prompt_file", str(path), "--outdir", "o"])
  assert sample_cli.read_prompts(args) == ["caf\u00e9", "second"]


def test_input_images_are_read_upright(tmp_path):
  """EXIF orientation 6 (stored sideways) is applied to --init_image / --mask / --lowres."""
  raw = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(raw).save(tmp_path / "sideways.png", exif=exif.tobytes())
  img = sample_cli.read_image(str(tmp_path / "sideways.png"), "--init_image")
  assert np.array_equal(img, np.rot90(raw, k=-1))


def _saved_model_dir(root, config):
  """A directory that load_model takes for a saved model; config.json is all that is read first."""
  os.makedirs(root / "params")
  text = config if isinstance(config, bytes) else json.dumps(config).encode()
  (root / "config.json").write_bytes(text)
  return str(root)


@pytest.fixture(scope="module")
def good_config(class_model):
  with open(os.path.join(class_model["good"], "config.json")) as f:
    return json.load(f)


def _edit(config, path, value):
  config = json.loads(json.dumps(config))
  node = config
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  return config


@pytest.mark.parametrize("edit, needles", [
    (lambda c: _edit(c, ["unet"], 5), ["unet = 5; expected an object"]),
    (lambda c: _edit(c, ["unet", "model_channels"], -32),
     ["unet.model_channels = -32; expected a positive integer"]),
    (lambda c: _edit(c, ["diffusion", "image_size"], None),
     ["diffusion.image_size = null; expected a positive integer"]),
    (lambda c: _edit(c, ["diffusion", "scale_factor"], [0.18, 0.18]),
     ["diffusion.scale_factor = [0.18, 0.18]; expected a finite number > 0"]),
    (lambda c: _edit(c, ["first_stage", "kwargs", "ch_mult"], []),
     ["first_stage.kwargs.ch_mult = []; expected a non-empty list"]),
    (lambda c: {k: v for k, v in c.items() if k != "first_stage"}, ["first_stage is missing"]),
    (lambda c: [c], ["the top level is list", "expected an object"]),
    (lambda c: b'{"unet": "caf\xe9"}', ["not UTF-8 text"]),
    (lambda c: b'{"unet": ', ["is not valid JSON"]),
])
def test_bad_saved_config_names_file_and_field(good_config, tmp_path, capsys, edit, needles):
  model_dir = _saved_model_dir(tmp_path / "model", edit(good_config))
  out = tmp_path / "out"
  code, lines = run_cli(["--checkpoint", model_dir, "--prompt", "a red circle", "--outdir",
                         str(out)], capsys)
  assert_refused(code, lines, os.path.join(model_dir, "config.json"), *needles)
  assert not out.exists()


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
  """A tiny class-conditional model saved twice: as initialised, and with one NaN UNet weight."""
  import jax
  from configs import shapes_ldm_text
  from ldm_jax import ldm
  from ldm_jax.convert import common
  cfg = shapes_ldm_text.get_config("tiny").model
  cfg.cond_stage = dict(kind="class", kwargs=dict(n_classes=19, embed_dim=128))
  model = ldm.LatentDiffusion.init(cfg, jax.random.PRNGKey(0))
  root = tmp_path_factory.mktemp("class_models")
  model.save(str(root / "good"))
  flat = {k: np.array(v) for k, v in common.flatten(model.params).items()}
  bad_key = sorted(k for k in flat if k[0] == "unet")[3]
  flat[bad_key].reshape(-1)[1] = np.nan
  ldm.LatentDiffusion(cfg, common.unflatten(flat)).save(str(root / "nan"))
  return {"good": str(root / "good"), "nan": str(root / "nan"), "bad_key": "/".join(bad_key)}


def test_nan_weights_name_the_parameter(class_model, tmp_path, capsys):
  out = tmp_path / "out"
  code, lines = run_cli(["--checkpoint", class_model["nan"], "--class_label", "1", "--steps", "2",
                         "--outdir", str(out)], capsys)
  assert_refused(code, lines, f"--checkpoint={class_model['nan']}",
                 f"parameter {class_model['bad_key']} holds 1 NaN or infinite value")
  assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (["--lowres", "{d}/init.png"], ["--lowres was given", "conditioned by 'class'"]),
    (["--prompt", "a red circle"], ["--prompt was given", "not text"]),
])
def test_inputs_the_model_cannot_use(class_model, files, tmp_path, capsys, extra, needles):
  out = tmp_path / "out"
  code, lines = run_cli(["--checkpoint", class_model["good"], "--class_label", "1", "--steps", "2"]
                        + [a.format(d=files) for a in extra] + ["--outdir", str(out)], capsys)
  assert_refused(code, lines, *needles)
  assert not out.exists()


def test_valid_class_model_still_samples(class_model, tmp_path, capsys):
  """The checks refuse only mistakes: the same model with good flags writes its samples."""
  out = tmp_path / "out"
  code, lines = run_cli(["--checkpoint", class_model["good"], "--class_label", "1", "--steps", "2",
                         "--guidance", "2", "--guidance_rescale", "0.5", "--seed", "4294967295",
                         "--no_progress", "--outdir", str(out)], capsys)
  assert code == 0, lines
  assert json.load(open(out / "samples.json"))["samples"][0]["seed"] == 4294967295


def test_evaluate_refuses_non_finite_guidance(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["samples", "--checkpoint", "/nonexistent", "--num_samples", "2",
                   "--guidance", "nan", "--out", str(tmp_path / "r.json")])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(lines) == 1 and "argument --guidance" in lines[0], lines


def test_damaged_params_one_line_naming_the_flag(good_config, tmp_path, capsys):
  """A good config.json over an empty params/ directory: the loader's error, on one line."""
  model_dir = _saved_model_dir(tmp_path / "model", good_config)
  code, lines = run_cli(["--checkpoint", model_dir, "--class_label", "1", "--outdir",
                         str(tmp_path / "out")], capsys)
  assert_refused(code, lines, f"cannot load the model --checkpoint={model_dir}:",
                 os.path.join(model_dir, "params"))


def test_sampler_flags_offer_the_registry_names():
  """sample.py and evaluate.py take every name of `diffusion.samplers` (aliases included) as is."""
  from ldm_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  for name in samplers.NAMES:
    assert sample.parse_args(NO_MODEL[:2] + ["--sampler", name, "--outdir", "o"]).sampler == name
    argv = ["samples", "--checkpoint", "ckpt", "--sampler", name, "--out", "r.json"]
    assert evaluate.parse_args(argv).sampler == name
  with pytest.raises(SystemExit):
    sample.parse_args(NO_MODEL[:2] + ["--sampler", "heun", "--outdir", "o"])
