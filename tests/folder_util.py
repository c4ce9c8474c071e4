"""Test helper: a folder of real-format data written from the shapes renderer.

    records = write_shapes_folder(root, n=4, size=32, num_objects=2)

writes root/000000.png ..., root/metadata.jsonl with each image's boxes in pixels
([x0, y0, x1, y1, class], the shapes class 0..17) and root/maps/000000.png ... (grayscale, 0 =
background, class + 1 on an object's pixels: 19 classes), and returns the rendered records with
'map' (uint8 [H, W]) and 'pixel_boxes' added. `coco_json` writes the same boxes as COCO instances.
"""

import json
import os

import numpy as np
from PIL import Image

from ldm_jax.data import shapes


def shapes_map(record) -> np.ndarray:
  """uint8 [H, W]: class + 1 where an object's box holds a pixel that is not white, else 0."""
  image = record["image"]
  h, w = image.shape[:2]
  ink = (image < 230).any(-1)  # [H, W]
  labels = np.zeros((h, w), np.uint8)
  ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  for box, lab in zip(record["boxes"], record["box_labels"]):
    inside = ((ys[:, None] >= box[1]) & (ys[:, None] <= box[3]) &
              (xs[None] >= box[0]) & (xs[None] <= box[2]))
    labels[inside & ink] = int(lab) + 1
  return labels


def write_shapes_folder(root, n: int = 4, size: int = 32, num_objects: int = 2, seed: int = 0,
                        maps: bool = True, metadata: bool = True) -> list[dict]:
  root = str(root)
  os.makedirs(os.path.join(root, "maps"), exist_ok=True)
  records, lines = [], []
  for i in range(n):
    rec = shapes.render_shapes(seed, i, size=size, num_objects=num_objects)
    name = f"{i:06d}.png"
    Image.fromarray(rec["image"]).save(os.path.join(root, name))
    rec["map"] = shapes_map(rec)
    if maps:
      Image.fromarray(rec["map"], mode="L").save(os.path.join(root, "maps", name))
    # Whole pixels, so that the boxes survive the JSON round trip exactly.
    rec["pixel_boxes"] = [[float(np.floor(b[0] * size)), float(np.floor(b[1] * size)),
                           float(np.ceil(b[2] * size)), float(np.ceil(b[3] * size)), int(lab)]
                          for b, lab in zip(rec["boxes"], rec["box_labels"])]
    rec["file_name"] = name
    lines.append(json.dumps({"file_name": name, "boxes": rec["pixel_boxes"]}))
    records.append(rec)
  if metadata:
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return records


def coco_json(path, records, category_ids=(3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55,
                                           59, 63, 67, 71)) -> None:
  """The records' boxes as a COCO instances file; class c has category id category_ids[c]."""
  images, anns = [], []
  for i, rec in enumerate(records):
    h, w = rec["image"].shape[:2]
    images.append({"id": 100 + i, "file_name": rec["file_name"], "width": w, "height": h})
    for x0, y0, x1, y1, c in rec["pixel_boxes"]:
      anns.append({"id": len(anns), "image_id": 100 + i, "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "category_id": category_ids[c], "iscrowd": 0})
  cats = [{"id": cid, "name": f"class{c}"} for c, cid in enumerate(category_ids)]
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats[::-1]}, f)
