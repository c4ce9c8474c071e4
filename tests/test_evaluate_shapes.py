"""The shapes grader: every prompt of the robustness set, grades of known images, and the
quickstart's last line that sets a run's rates beside the README's range."""

import json

import numpy as np
from PIL import Image

from ldm_jax import evaluate_shapes
from ldm_jax.data import shapes, shapes_detect


def test_every_prompt_covers_each_colour_shape_position_once():
  prompts = evaluate_shapes.every_prompt()
  triples = [shapes_detect.parse_caption(p)[0] for p in prompts]
  assert len(prompts) == 90 and len(set(triples)) == 90
  assert {t[0] for t in triples} == set(shapes.COLOR_NAMES)
  assert {t[1] for t in triples} == set(shapes.SHAPES)
  assert {t[2] for t in triples} == set(shapes.POSITION_NAMES)


def write_samples(tmp_path, pairs):
  """Writes (image, prompt) pairs as a sample.py output directory."""
  records = []
  for i, (image, prompt) in enumerate(pairs):
    Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    records.append({"prompt": prompt, "file": f"{i:06d}.png", "seed": i})
  (tmp_path / "samples.json").write_text(json.dumps({"samples": records}))


def test_grade_and_quickstart_line(tmp_path, capsys):
  ex = [shapes.render_shapes(3, i, size=32) for i in range(4)]
  right = [(e["image"], e["caption"]) for e in ex[:3]]
  blank = np.full((32, 32, 3), 255, np.uint8)  # Nothing drawn: every attribute wrong.
  write_samples(tmp_path, right + [(blank, ex[3]["caption"])])
  assert evaluate_shapes.main([str(tmp_path), "--quickstart"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("4 samples: color 75%, shape 75%, position 75%")
  summary = json.loads((tmp_path / "match.json").read_text())["summary"]
  assert summary["all"] == 0.75 and summary["num_samples"] == 4
  assert lines[-1] == evaluate_shapes.compare_with_expected(summary)
  assert lines[-1].startswith("This run: color 75% (expected ")


def test_compare_with_expected_names_what_fell_short():
  expected = {"color": (0.9, 1.0), "shape": (0.8, 1.0), "position": (0.95, 1.0),
              "all": (0.75, 1.0)}
  good = {"color": 1.0, "shape": 0.875, "position": 1.0, "all": 0.8125}
  line = evaluate_shapes.compare_with_expected(good, expected)
  assert line == ("This run: color 100% (expected 90%-100%), shape 88% (expected 80%-100%), "
                  "position 100% (expected 95%-100%), all 81% (expected 75%-100%): within the "
                  "README's range.")
  bad = dict(good, shape=0.5, all=0.5)
  assert evaluate_shapes.compare_with_expected(bad, expected).endswith(
      "BELOW the README's range for shape, all: see README, Measured results.")
