"""sample.py --layout and --semantic_map: they change the samples of the models that take them, and
are refused (one line, exit 2) for models that do not, or when their files are wrong.

The models are the tiny layout and semantic-synthesis configs with random weights (drawn with
numpy into the shapes `init` would give, which skips compiling the initialisers): whether the flags
reach the network needs no training. The checks of the files run in-process on parameter-free
models; two command lines show that a refusal ends as one line with exit code 2.
"""

import argparse
import json

import jax
import numpy as np
import pytest
from PIL import Image

import cli_util
from configs import layout2img, semantic_synthesis
from ldm_jax import ldm
from ldm_jax import networks
from ldm_jax.cli import spatial_inputs
from ldm_jax.errors import UserError

SIZE = 32  # output pixels (the tiny models' stride is 8)


CONFIGS = {"layout": layout2img, "semantic": semantic_synthesis}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> a saved model directory with random weights."""
  root = tmp_path_factory.mktemp("spatial_models")
  rng = np.random.default_rng(0)
  out = {}
  for name, module in CONFIGS.items():
    config = module.get_config("tiny").model
    shapes = jax.eval_shape(lambda: networks.init_params(config, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    ldm.LatentDiffusion(config, params).save(str(root / name))
    out[name] = str(root / name)
  return out


@pytest.fixture
def files(tmp_path):
  (tmp_path / "a.json").write_text(json.dumps([[2, 2, 14, 14, 3], [18, 18, 30, 30, 11]]))
  (tmp_path / "b.json").write_text(json.dumps([[16, 0, 32, 12, 7]]))
  (tmp_path / "outside.json").write_text(json.dumps([[2, 2, 40, 14, 3]]))
  (tmp_path / "class.json").write_text(json.dumps([[2, 2, 14, 14, 18]]))
  (tmp_path / "bad.json").write_text("[[2, 2,")
  (tmp_path / "none.json").write_text("[]")
  a = np.zeros((SIZE, SIZE), np.uint8)
  a[:, 16:] = 4
  b = np.zeros((SIZE, SIZE), np.uint8)
  b[8:24, 8:24] = 12
  Image.fromarray(a).save(tmp_path / "a.png")
  Image.fromarray(b).save(tmp_path / "b.png")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
  Image.fromarray(np.full((SIZE, SIZE), 19, np.uint8)).save(tmp_path / "class.png")
  return tmp_path


def _sample(model_dir, extra, outdir, capsys):
  args = ["--checkpoint", model_dir, "--steps", "2", "--seed", "5", "--height", str(SIZE),
          "--width", str(SIZE), "--outdir", str(outdir), "--no_progress"] + extra
  code, _, err = cli_util.run_sample(args, capsys)
  return code, err


@pytest.mark.parametrize("family, flag", [("layout", "--layout"), ("semantic", "--semantic_map")])
def test_the_condition_changes_the_sample(models, files, tmp_path, capsys, family, flag):
  ext = "json" if family == "layout" else "png"
  images = []
  for name in ("a", "b"):
    code, err = _sample(models[family], [flag, str(files / f"{name}.{ext}")], tmp_path / name,
                        capsys)
    assert code == 0, err
    images.append(np.asarray(Image.open(tmp_path / name / "000000.png"), np.float32))
    meta = json.load(open(tmp_path / name / "samples.json"))
    assert meta["settings"][flag[2:]] == str(files / f"{name}.{ext}")
  assert images[0].shape == (SIZE, SIZE, 3)
  assert np.abs(images[0] - images[1]).mean() > 0.5  # Same seed, other layout / map.


@pytest.mark.parametrize("family, extra, message", [
    ("semantic", ["--layout", "{d}/a.json"], "--layout was given, but this is not a "
                                             "layout-to-image model (it is conditioned by "
                                             "'spatial_rescaler')"),
    ("layout", ["--layout", "{d}/outside.json"], "--layout={d}/outside.json: box 0 [2, 2, 40, 14, "
                                                 "3] is not inside the 32x32 image"),
])
def test_refusals_end_as_one_line_with_exit_code_2(models, files, tmp_path, capsys, family, extra,
                                                   message):
  code, err = _sample(models[family], [a.format(d=files) for a in extra], tmp_path / "o", capsys)
  lines = [line for line in err.strip().splitlines() if line]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error:"), err
  assert message.format(d=files) in lines[0], err


def _args(**flags):
  args = dict(layout=None, semantic_map=None, prompt=None, prompt_file=None, lowres=None)
  args.update(flags)
  return argparse.Namespace(**args)


@pytest.mark.parametrize("family, flags, message", [
    ("layout", dict(semantic_map="{d}/a.png"), "--semantic_map was given, but this is not a "
                                               "semantic-synthesis model (it is conditioned by "
                                               "'ldm_bert')"),
    ("layout", {}, "this is a layout-to-image model: give --layout"),
    ("semantic", {}, "this is a semantic-synthesis model: give --semantic_map"),
    ("layout", dict(layout="{d}/a.json", prompt=["x"]), "give --layout instead"),
    ("semantic", dict(semantic_map="{d}/a.png", lowres="{d}/a.png"), "give --semantic_map instead"),
    ("layout", dict(layout="{d}/missing.json"), "--layout={d}/missing.json: no such file"),
    ("layout", dict(layout="{d}/bad.json"), "--layout={d}/bad.json: not a UTF-8 JSON file"),
    ("layout", dict(layout="{d}/class.json"), "--layout={d}/class.json: box 0 [2, 2, 14, 14, 18] "
                                              "has class 18; expected an integer in [0, 18)"),
    ("layout", dict(layout="{d}/none.json"), "--layout={d}/none.json: 0 boxes; this model codes "
                                             "1 to 2"),
    ("semantic", dict(semantic_map="{d}/missing.png"), "{d}/missing.png: no such segmentation map"),
    ("semantic", dict(semantic_map="{d}/small.png"), "{d}/small.png: map of 16x16 px; expected "
                                                     "the image's size 32x32"),
    ("semantic", dict(semantic_map="{d}/class.png"), "{d}/class.png: 1024 pixels hold class 19; "
                                                     "expected class indices in [0, 19)"),
])
def test_flags_and_files_are_checked_naming_them(files, family, flags, message):
  model = ldm.LatentDiffusion(CONFIGS[family].get_config("tiny").model, {})  # no weights needed
  args = _args(**{k: v.format(d=files) if isinstance(v, str) else v for k, v in flags.items()})
  with pytest.raises(UserError) as e:
    spatial_inputs.read_inputs(args, model, SIZE, SIZE)
  assert message.format(d=files) in str(e.value)


def test_inputs_are_the_models_tokens_and_one_hot_map(files):
  layout = ldm.LatentDiffusion(layout2img.get_config("tiny").model, {})
  tokens = spatial_inputs.read_inputs(_args(layout=str(files / "a.json")), layout, SIZE, SIZE)
  # [[2, 2, 14, 14, 3], [18, 18, 30, 30, 11]] in a 32 px image, corners on the 16-cell grid.
  q = lambda v: int(np.rint(v / SIZE * 15))
  want = [256 + 3, q(2) * 16 + q(2), q(14) * 16 + q(14), 256 + 11, q(18) * 16 + q(18),
          q(30) * 16 + q(30)]
  assert tokens["tokens"].tolist() == want
  semantic = ldm.LatentDiffusion(semantic_synthesis.get_config("tiny").model, {})
  images = spatial_inputs.read_inputs(_args(semantic_map=str(files / "a.png")), semantic, SIZE,
                                      SIZE)["images"]
  assert images.shape == (SIZE, SIZE, 19)
  assert images[:, :16, 0].min() == 1 and images[:, 16:, 4].min() == 1 and images.sum() == SIZE ** 2
