"""sample.py's inputs for layout and semantic-synthesis models: `--layout` and `--semantic_map`.

    --layout boxes.json      a JSON list of [x0, y0, x1, y1, class]: pixels of the output image,
                             integer classes, as in a training folder's metadata.jsonl "boxes"
    --semantic_map map.png   a PNG of class indices (palette or grayscale) of the output's size,
                             as in a training folder's maps/

Both are read and checked by the functions that read training data (`data.annotations`), so a file
is accepted here exactly when it would be accepted for training. A flag the model cannot take, or a
model without the flag it needs, is a UserError.
"""

import json

import numpy as np

from ldm_jax.data import annotations
from ldm_jax.data import transforms
from ldm_jax.errors import UserError
from ldm_jax.train import ldm_task


def is_semantic(model) -> bool:
  """A semantic-synthesis model: its condition is a one-hot map through a spatial rescaler."""
  return model.cond_kind == "spatial_rescaler"


def check_flags(args, model) -> None:
  """Refuses --layout / --semantic_map for models that do not take them, and their absence (or
  a competing condition flag) for models that do."""
  layout, semantic = ldm_task.is_layout(model), is_semantic(model)
  if args.layout and not layout:
    raise UserError(f"--layout was given, but this is not a layout-to-image model (it is "
                    f"conditioned by '{model.cond_kind}').")
  if args.semantic_map and not semantic:
    raise UserError(f"--semantic_map was given, but this is not a semantic-synthesis model (it is "
                    f"conditioned by '{model.cond_kind}').")
  if layout and not args.layout:
    raise UserError("this is a layout-to-image model: give --layout (a JSON list of "
                    "[x0, y0, x1, y1, class] in pixels).")
  if layout and (args.prompt or args.prompt_file):
    raise UserError("--prompt was given, but this layout-to-image model is conditioned by boxes: "
                    "give --layout instead.")
  if semantic and not args.semantic_map:
    raise UserError("this is a semantic-synthesis model: give --semantic_map (a PNG of class "
                    "indices).")
  if semantic and args.lowres:
    raise UserError("--lowres was given, but this semantic-synthesis model is conditioned by a "
                    "class map: give --semantic_map instead.")


def read_inputs(args, model, height: int, width: int) -> dict[str, np.ndarray]:
  """The sampler's condition for one sample: {'tokens': int32 [L]} for --layout, {'images':
  float32 [H, W, classes]} (the one-hot map) for --semantic_map, {} otherwise."""
  check_flags(args, model)
  if args.layout:
    return {"tokens": layout_tokens(args.layout, model, height, width)}
  if args.semantic_map:
    channels = int(model.cond_stage_config["kwargs"]["in_channels"])
    try:
      labels = annotations.read_map(args.semantic_map, channels, (height, width))
    except annotations.AnnotationError as e:
      raise UserError(f"--semantic_map: {e} (the output is {width}x{height}; --width / --height "
                      f"set it).") from None
    return {"images": annotations.one_hot(labels, channels)}  # [H, W, classes]
  return {}


def layout_tokens(path: str, model, height: int, width: int) -> np.ndarray:
  """--layout's boxes (pixels of the height x width output) as the model's tokens, int32 [L]."""
  try:
    coding = transforms.layout_coding(model.cond_stage_config)
  except ValueError as e:
    raise UserError(f"--layout: this model cannot code boxes ({e}).") from None
  try:
    with open(path, "rb") as f:
      raw = json.loads(f.read().decode("utf-8"))
  except FileNotFoundError:
    raise UserError(f"--layout={path}: no such file.") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"--layout={path}: not a UTF-8 JSON file ({e}).") from None
  try:
    boxes = annotations.check_boxes(raw, f"--layout={path}", height, width, coding.num_classes)
  except annotations.AnnotationError as e:
    raise UserError(f"{e}.") from None
  if not 1 <= len(boxes) <= coding.max_objects:
    raise UserError(f"--layout={path}: {len(boxes)} boxes; this model codes 1 to "
                    f"{coding.max_objects}.")
  return coding.tokens(boxes[:, :4], boxes[:, 4].astype(np.int32))
