"""Do the paper's conditional tasks follow their condition? Shapes scenes, graded by the detector
(a benchmark, not a test).

For each task, a short training on the shapes data, then N held-out scenes sampled twice from the
same seeds: once with each scene's own condition and once with a control (another scene's
condition, and for the class model also the null label), both graded against the scene's own
condition by the shapes detector. A model that ignored its condition would score the same in both.
  class     configs/shapes_ldm_class.py (one object, cross-attention on a class token, guidance
            3): a hit is a sample whose largest object has the label's colour and shape;
  layout    configs/layout2img.py's network at shapes size (two objects, boxes as class +
            corner tokens through the paper's box transformer, cross-attention): a hit is a
            sample where every box holds a detected object of its class, centred inside it;
  semantic  configs/semantic_synthesis.py's network at shapes size (two objects, one-hot class
            map -> SpatialRescaler -> concatenated to z_t): hit as for layout, the map's objects
            being the scene's boxes and classes.
Two reference rows grade real images: the scenes' own renders against their condition (what the
detector can read at this size) and the control scenes' renders against the true condition (what
a model that follows the control perfectly would score).

The layout and semantic variants keep their configs' conditioning networks but sit on the
quickstart's KL-f4 32 px autoencoder (8x8x4 latents) and train with the class model's optimiser
and schedule: the paper's learning rates (1e-6 to 2e-6 x batch) are for 500k-step runs. Under
--root, each stage is reused when its workdir has a summary.json.

  python benchmarks/conditioning_fidelity.py --root /tmp/fidelity \
      --ae workdirs/seeds_new/seed1/ae --class_steps 2000 --layout_steps 2000 \
      --semantic_steps 2000 --num_scenes 128
Prints one row per task and condition and writes `conditioning_fidelity.json` under --root.
"""

import argparse
import json
import os
import sys
import time

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # also when loaded by path, as the tests do

from classifier_guidance import train  # noqa: E402
from configs import common, layout2img, semantic_synthesis  # noqa: E402
from configs import shapes_autoencoder, shapes_ldm_class  # noqa: E402
from ldm_jax import ldm as ldm_lib  # noqa: E402
from ldm_jax import sampling  # noqa: E402
from ldm_jax import workdir_layout as layout  # noqa: E402
from ldm_jax.data import shapes as shapes_lib  # noqa: E402
from ldm_jax.data import shapes_detect  # noqa: E402
from ldm_jax.train import ldm_task  # noqa: E402

TASKS = ("class", "layout", "semantic")
OBJECTS = {"class": 1, "layout": 2, "semantic": 2}  # objects per scene, in training and here
EVAL_SEED = 20_261_206  # Held-out scenes: training draws from the shapes seed of --seed.
BATCH = 64  # samples per sampling call


# ------------------------------------------------------------------ task configs ------------------
def task_config(task: str, ae_dir: str, steps: int, seed: int) -> ml_collections.ConfigDict:
  """The shapes-size config of `task`, on the autoencoder in `ae_dir`, trained `steps` steps."""
  c = shapes_ldm_class.get_config("")
  if task == "layout":
    unet = dict(c.model.unet)
    unet["context_dim"] = 128  # = the box transformer's width
    c.model = ml_collections.ConfigDict(dict(
        first_stage=c.model.first_stage.to_dict(), unet=unet,
        cond_stage=dict(
            kind="ldm_bert",
            kwargs=dict(vocab_size=layout2img.SHAPES_VOCAB, max_length=layout2img.SHAPES_TOKENS,
                        width=128, depth=2, heads=4, head_dim=32, mlp_ratio=4, epsilon=1e-5),
            tokenizer=dict(kind=None, path=""),
            layout=dict(grid=layout2img.SHAPES_GRID, num_classes=layout2img.SHAPES_CLASSES,
                        max_objects=layout2img.SHAPES_TOKENS // 3)),
        diffusion=c.model.diffusion.to_dict(),
        sampling=common.sampling(guidance=1.0).to_dict()))  # Trained without condition dropout.
  elif task == "semantic":
    z, seg = 4, semantic_synthesis.SEG_CHANNELS
    diffusion = c.model.diffusion.to_dict()
    diffusion["conditioning_key"] = "concat"
    c.model = ml_collections.ConfigDict(dict(
        first_stage=c.model.first_stage.to_dict(),
        # As released: no cross-attention, attention in the middle block only (no level has a
        # down-sampling factor of 32, 16 or 8).
        unet=common.unet_kwargs(in_channels=z + seg, out_channels=z, model_channels=64,
                                channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(32, 16, 8), num_head_channels=32),
        # 32 px one-hot maps, two bilinear halvings -> 8x8 = the latent size.
        cond_stage=dict(kind="spatial_rescaler",
                        kwargs=dict(n_stages=2, method="bilinear", multiplier=0.5,
                                    in_channels=semantic_synthesis.SHAPES_SEG_CLASSES,
                                    out_channels=seg, bias=False)),
        diffusion=diffusion,
        sampling=common.sampling(guidance=1.0).to_dict()))
  elif task != "class":
    raise ValueError(f"task {task!r}; expected one of {', '.join(TASKS)}")
  if task != "class":
    c.data.label_key = ""
    c.train.cond_drop_prob = 0.0  # No guidance for these tasks, so no null condition to learn.
    c.log.sample_guidance = 1.0
  c.data.num_objects = OBJECTS[task]
  c.first_stage_checkpoint = ae_dir
  c.train.num_steps, c.checkpoint.every, c.seed = steps, steps, seed
  return c


def check_autoencoder(ae_dir: str) -> None:
  """Refuses an --ae whose autoencoder is not configs/shapes_autoencoder.py's, before training."""
  path = layout.first_stage_path(ae_dir)
  want = shapes_autoencoder.get_config("").model.first_stage.to_dict()
  try:
    with open(path, encoding="utf-8") as f:
      got = json.load(f)
  except (OSError, ValueError) as e:
    raise SystemExit(f"--ae={ae_dir}: cannot read {path} ({e}); expected a workdir of "
                     f"configs/shapes_autoencoder.py.") from None
  norm = lambda d: json.loads(json.dumps(d))  # tuples -> lists, as saved
  if norm(got) != norm(want):
    raise SystemExit(f"--ae={ae_dir}: its first stage {got} is not configs/shapes_autoencoder.py's "
                     f"{norm(want)}; these task configs expect the quickstart KL-f4 32 px one.")


# ------------------------------------------------------------------ scoring -----------------------
def wanted_objects(scene: dict) -> list[tuple[str, str, np.ndarray]]:
  """(colour, shape, box [x0, y0, x1, y1] fractions) of each object of a rendered scene."""
  return [(shapes_lib.COLOR_NAMES[c], shapes_lib.SHAPES[s], np.asarray(b)) for c, s, b in
          zip(scene["colors"], scene["shapes"], scene["boxes"])]


def score(task: str, found: list[dict], scene: dict) -> dict[str, float]:
  """How the detected objects `found` (largest first) follow `scene`'s condition.

  hit: class, the largest object has the scene's colour and shape; layout / semantic, every object
    of the scene is matched by its own detected object of the same colour and shape whose centre
    lies inside the object's box.
  exact: hit, and nothing else was detected. objects: the fraction of the scene's objects matched
    (class: the hit). found: objects detected.
  """
  want = wanted_objects(scene)
  if task == "class":
    hit = bool(found) and (found[0]["color"], found[0]["shape"]) == want[0][:2]
    matched = float(hit)
  else:
    free = list(found)
    count = 0
    for color, shape, box in want:
      for o in free:
        cx, cy = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
        if ((o["color"], o["shape"]) == (color, shape) and box[0] <= cx <= box[2]
            and box[1] <= cy <= box[3]):
          free.remove(o)
          count += 1
          break
    hit = count == len(want)
    matched = count / len(want)
  return {"hit": float(hit), "exact": float(hit and len(found) == len(want)),
          "objects": matched, "found": float(len(found))}


def grade(task: str, images: np.ndarray, scenes: list[dict]) -> dict[str, float]:
  """Mean of `score` over uint8 images [N, H, W, 3] graded against their scenes."""
  rows = [score(task, shapes_detect.detect_shapes(im), s) for im, s in zip(images, scenes)]
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ------------------------------------------------------------------ sampling ----------------------
def conditions(task: str, model, config, scenes: list[dict]) -> dict:
  """The sampler's inputs for `scenes`, made as training made them (`ldm_task.task_inputs`)."""
  if task == "class":
    return {"labels": [int(s["label"]) for s in scenes]}
  batch = {"image": np.stack([s["image"] for s in scenes]).astype(np.float32) / 127.5 - 1.0,
           "boxes": [s["boxes"] for s in scenes], "box_labels": [s["box_labels"] for s in scenes]}
  extra = ldm_task.task_inputs(model, batch, config, np.random.default_rng(0))
  return {"tokens": extra["tokens"]} if task == "layout" else {"images": extra["seg"]}


def draw(model, inputs: dict, seeds: list[int], steps: int) -> np.ndarray:
  """uint8 samples [N, H, W, 3], BATCH at a time, each from its own seed."""
  out = []
  for i in range(0, len(seeds), BATCH):
    part = {k: v[i:i + BATCH] for k, v in inputs.items()}
    out.append(ldm_lib.to_uint8(sampling.sample(model, seeds=seeds[i:i + BATCH], sampler="ddim",
                                                steps=steps, **part)))
  return np.concatenate(out)


def run_task(task: str, ldm_dir: str, config, args) -> list[dict]:
  """Samples and grades `task`'s model: rows for the true condition, the controls and the real
  images."""
  model = ldm_lib.LatentDiffusion.from_checkpoint(ldm_dir)
  size = int(config.data.image_size)
  scenes = [shapes_lib.render_shapes(args.eval_seed, i, size=size, num_objects=OBJECTS[task])
            for i in range(args.num_scenes)]
  # Control: scene i gets scene i+1's condition (never its own scene; it may agree by chance,
  # which the "control scenes' renders" row measures).
  shuffled = scenes[1:] + scenes[:1]
  seeds = list(range(len(scenes)))
  arms = [("true", conditions(task, model, config, scenes)),
          ("shuffled", conditions(task, model, config, shuffled))]
  if task == "class":
    arms.append(("null label", {"labels": [shapes_lib.NULL_CLASS] * len(scenes)}))
  rows = []
  for name, inputs in arms:
    t0 = time.time()
    images = draw(model, inputs, seeds, args.steps)
    rows.append({"task": task, "condition": name, **grade(task, images, scenes),
                 "seconds": time.time() - t0})
  real = np.stack([s["image"] for s in scenes])
  rows.append({"task": task, "condition": "real renders", **grade(task, real, scenes)})
  rows.append({"task": task, "condition": "control scenes' renders",
               **grade(task, real[np.r_[1:len(scenes), 0]], scenes)})
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True)
  p.add_argument("--ae", help="an existing configs/shapes_autoencoder.py workdir (skips training "
                              "one)")
  p.add_argument("--ae_steps", type=int, default=1500)
  p.add_argument("--tasks", default=",".join(TASKS), help="some of " + ", ".join(TASKS))
  for task in TASKS:
    p.add_argument(f"--{task}_steps", type=int, default=3000, help=f"{task} LDM training steps")
  p.add_argument("--num_scenes", type=int, default=128, help="held-out scenes per task")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--seed", type=int, default=0, help="training seed of every stage")
  p.add_argument("--eval_seed", type=int, default=EVAL_SEED, help="shapes seed of the scenes")
  args = p.parse_args()
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    p.error(f"--tasks={args.tasks!r}: expected some of {', '.join(TASKS)}")
  if args.num_scenes < 2:
    p.error(f"--num_scenes={args.num_scenes}: expected at least 2 (the control shuffles them)")
  os.makedirs(args.root, exist_ok=True)
  record = {"args": vars(args), "seconds": {}, "results": []}

  ae_dir = args.ae or os.path.join(args.root, "ae")
  if args.ae:
    check_autoencoder(args.ae)
  else:
    c = shapes_autoencoder.get_config("")
    c.train.num_steps, c.checkpoint.every, c.seed = args.ae_steps, args.ae_steps, args.seed
    record["seconds"]["autoencoder"] = train(c, ae_dir)
  for task in tasks:
    ldm_dir = os.path.join(args.root, task)
    config = task_config(task, ae_dir, getattr(args, f"{task}_steps"), args.seed)
    record["seconds"][task] = train(config, ldm_dir)
    with open(layout.summary_path(ldm_dir)) as f:
      record.setdefault("final_loss", {})[task] = json.load(f).get("loss")
    record["results"] += run_task(task, ldm_dir, config, args)

  print(f"{args.num_scenes} held-out scenes per task, DDIM {args.steps} steps; every row graded "
        f"against the scene's own condition")
  print(f"{'task':>9} {'condition':>24} {'hit':>6} {'exact':>6} {'objects':>8} {'found':>6}")
  for r in record["results"]:
    print(f"{r['task']:>9} {r['condition']:>24} {r['hit']:>6.3f} {r['exact']:>6.3f} "
          f"{r['objects']:>8.3f} {r['found']:>6.2f}")
  out = os.path.join(args.root, "conditioning_fidelity.json")
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"Wrote {out}")


if __name__ == "__main__":
  main()
