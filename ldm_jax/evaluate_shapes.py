"""Grades samples of a shapes model against their prompts or labels with the shapes detector.

  python -m ldm_jax.evaluate_shapes outputs/quickstart     # a sample.py output directory

Reads samples.json, detects the objects in every PNG and prints, per attribute and overall, the
fraction of samples whose detected color / shape / position match what was asked; writes
`match.json` beside the samples.
"""

import argparse
import json
import os
import sys

import numpy as np

from ldm_jax.data import shapes as shapes_lib
from ldm_jax.data import shapes_detect


def wanted(record: dict) -> tuple[str, ...] | None:
  """(color, shape, position) asked for by a text prompt, or (color, shape) by a class label."""
  if "prompt" in record:
    triples = shapes_detect.parse_caption(record["prompt"])
    return triples[0] if len(triples) == 1 else None
  if "label" in record and 0 <= record["label"] < shapes_lib.NUM_CLASSES:
    c, s = divmod(int(record["label"]), len(shapes_lib.SHAPES))
    return (shapes_lib.COLOR_NAMES[c], shapes_lib.SHAPES[s])
  return None


def grade(sample_dir: str) -> dict:
  from PIL import Image
  with open(os.path.join(sample_dir, "samples.json")) as f:
    records = json.load(f)["samples"]
  rows = []
  for r in records:
    want = wanted(r)
    if want is None:
      continue
    image = np.asarray(Image.open(os.path.join(sample_dir, r["file"])).convert("RGB"))
    found = shapes_detect.detect_shapes(image)
    got = (found[0]["color"], found[0]["shape"], found[0]["position"]) if found else (None,) * 3
    row = {"file": r["file"], "want": list(want), "got": list(got),
           "objects_found": len(found)}
    row["color"] = got[0] == want[0]
    row["shape"] = got[1] == want[1]
    row["position"] = len(want) < 3 or got[2] == want[2]
    row["all"] = row["color"] and row["shape"] and row["position"] and len(found) == 1
    rows.append(row)
  if not rows:
    raise ValueError(f"{sample_dir}/samples.json: no sample names a single shapes object.")
  summary = {k: float(np.mean([r[k] for r in rows])) for k in ("color", "shape", "position",
                                                                 "all")}
  summary["num_samples"] = len(rows)
  return {"summary": summary, "samples": rows}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("sample_dir")
  args = p.parse_args(argv)
  try:
    result = grade(args.sample_dir)
  except (OSError, ValueError) as e:
    print(f"evaluate_shapes: error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(args.sample_dir, "match.json"), "w") as f:
    json.dump(result, f, indent=2)
  s = result["summary"]
  print(f"{s['num_samples']} samples: color {s['color']:.0%}, shape {s['shape']:.0%}, "
        f"position {s['position']:.0%}, all (exactly one matching object) {s['all']:.0%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
