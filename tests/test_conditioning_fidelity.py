"""benchmarks/conditioning_fidelity.py's grading: a sample follows its condition only when the right
objects sit in the right boxes, and a real render of another scene does not pass for this one."""

import numpy as np
import pytest

from benchmark_util import load_benchmark


@pytest.fixture(scope="module")
def fidelity():
  return load_benchmark("conditioning_fidelity")


def scene(objects):
  """A scene dict as render_shapes gives it, from (colour index, shape index, box) triples."""
  return {"colors": [o[0] for o in objects], "shapes": [o[1] for o in objects],
          "boxes": np.array([o[2] for o in objects], np.float32)}


def found(color, shape, box):
  return {"color": color, "shape": shape, "box": box}


LEFT, RIGHT = (0.1, 0.1, 0.4, 0.4), (0.6, 0.6, 0.9, 0.9)
TWO = scene([(0, 0, LEFT), (2, 1, RIGHT)])  # a red circle top left, a blue square bottom right


def test_boxes_need_their_class_inside_each_box(fidelity):
  both = [found("red", "circle", LEFT), found("blue", "square", RIGHT)]
  assert fidelity.score("layout", both, TWO) == {"hit": 1.0, "exact": 1.0, "objects": 1.0,
                                                  "found": 2.0}
  # Extra objects keep the hit but not `exact`.
  extra = both + [found("green", "triangle", (0.4, 0.4, 0.6, 0.6))]
  assert fidelity.score("semantic", extra, TWO)["hit"] == 1.0
  assert fidelity.score("semantic", extra, TWO)["exact"] == 0.0
  # Swapped places, a wrong shape, or one detection for two boxes: not followed.
  swapped = [found("red", "circle", RIGHT), found("blue", "square", LEFT)]
  assert fidelity.score("layout", swapped, TWO)["objects"] == 0.0
  wrong_shape = [found("red", "circle", LEFT), found("blue", "circle", RIGHT)]
  assert fidelity.score("layout", wrong_shape, TWO)["objects"] == 0.5
  assert fidelity.score("layout", wrong_shape, TWO)["hit"] == 0.0
  one = scene([(0, 0, LEFT), (0, 0, (0.05, 0.05, 0.45, 0.45))])
  assert fidelity.score("layout", [found("red", "circle", LEFT)], one)["objects"] == 0.5


def test_class_reads_the_largest_object(fidelity):
  want = scene([(0, 0, LEFT)])
  assert fidelity.score("class", [found("red", "circle", RIGHT)], want)["hit"] == 1.0
  assert fidelity.score("class", [found("red", "square", LEFT),
                                  found("red", "circle", LEFT)], want)["hit"] == 0.0
  assert fidelity.score("class", [], want)["hit"] == 0.0


def test_real_renders_follow_their_own_scene_only(fidelity):
  from ldm_jax.data import shapes
  scenes = [shapes.render_shapes(7, i, size=32, num_objects=2) for i in range(4)]
  images = np.stack([s["image"] for s in scenes])
  assert fidelity.grade("layout", images, scenes)["hit"] == 1.0
  # Each image graded against the next scene (different corners or classes): none passes.
  assert fidelity.grade("layout", images, scenes[1:] + scenes[:1])["hit"] == 0.0
