"""Classifier guidance on shapes, end to end (a benchmark, not a test).

Does a noisy-latent classifier steer an UNconditional shapes LDM towards a requested class? Under
--root (each stage reused when its workdir has a summary.json, so a run can be resumed or
shortened by passing an existing workdir):
1. the shapes autoencoder (configs/shapes_autoencoder.py), or --ae WORKDIR;
2. an unconditional LDM on its latents: configs/shapes_ldm_class.py without its condition (same
   UNet less the cross-attention, no label dropout), or --ldm WORKDIR;
3. the noisy-latent classifier on that LDM's latents (configs/shapes_classifier.py);
4. N samples per class (18 classes: colour x shape) from the same seeds, unguided and guided at
   each --scales value (DDIM), graded by the shapes detector: a hit is a sample whose largest
   detected object has the requested colour and shape. Unguided, a good model hits about 1/18.
Prints one row per scale and writes `classifier_guidance.json` under --root.

  python benchmarks/classifier_guidance.py --root workdirs/clf_bench
  python benchmarks/classifier_guidance.py --root /tmp/clf_small --ae_steps 600 \
      --ldm_steps 1200 --classifier_steps 600 --per_class 4 --scales 0,5,10
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

from configs import common, shapes_autoencoder, shapes_classifier, shapes_ldm_class  # noqa: E402
from ldm_jax import ldm as ldm_lib  # noqa: E402
from ldm_jax import sampling  # noqa: E402
from ldm_jax import workdir_layout as layout  # noqa: E402
from ldm_jax.cli import train as entry  # noqa: E402
from ldm_jax.data import shapes as shapes_lib  # noqa: E402
from ldm_jax.data import shapes_detect  # noqa: E402


def uncond_ldm_config(ae_dir: str, steps: int, seed: int):
  """configs/shapes_ldm_class.py without its condition: the same UNet less the cross-attention,
  on the latent space of configs/shapes_classifier.py, trained without label dropout."""
  c = shapes_ldm_class.get_config("")
  unet = c.model.unet
  c.model = ml_collections.ConfigDict(dict(
      first_stage=c.model.first_stage.to_dict(),
      unet=common.unet_kwargs(in_channels=4, model_channels=unet.model_channels,
                              channel_mult=tuple(unet.channel_mult),
                              num_res_blocks=unet.num_res_blocks,
                              attention_resolutions=tuple(unet.attention_resolutions),
                              num_head_channels=unet.num_head_channels),
      diffusion=shapes_classifier.get_config("").model.diffusion.to_dict(),
      sampling=common.sampling(guidance=1.0).to_dict()))  # Nothing to guide without a condition.
  c.train.cond_drop_prob = 0.0
  c.log.sample_guidance = 1.0
  c.data.label_key = ""
  c.first_stage_checkpoint = ae_dir
  c.train.num_steps = steps
  c.checkpoint.every = steps
  c.seed = seed
  return c


def train(config, workdir: str) -> float | None:
  """Trains unless `workdir` already has a summary; returns the wall time it took."""
  if os.path.exists(layout.summary_path(workdir)):
    return None
  config.mesh.num_devices = 1
  t0 = time.time()
  entry.train(config, workdir)
  return time.time() - t0


def hit_rate(images: np.ndarray, labels: list[int]) -> tuple[float, float]:
  """(fraction whose largest object has the label's colour and shape, fraction with any object)."""
  hits, found = [], []
  for image, label in zip(images, labels):
    objects = shapes_detect.detect_shapes(image)
    found.append(bool(objects))
    want = (shapes_lib.COLOR_NAMES[label // 3], shapes_lib.SHAPES[label % 3])
    hits.append(bool(objects) and (objects[0]["color"], objects[0]["shape"]) == want)
  return float(np.mean(hits)), float(np.mean(found))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True)
  p.add_argument("--ae", help="an existing shapes autoencoder workdir (skips stage 1)")
  p.add_argument("--ldm", help="an existing unconditional shapes LDM workdir (skips stage 2)")
  p.add_argument("--ae_steps", type=int, default=1500)
  p.add_argument("--ldm_steps", type=int, default=3000)
  p.add_argument("--classifier_steps", type=int, default=1500)
  p.add_argument("--per_class", type=int, default=8, help="samples per class and scale")
  p.add_argument("--scales", default="0,2,5,10", help="classifier scales (0 = unguided)")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--seed", type=int, default=0, help="training seed of every stage")
  args = p.parse_args()
  os.makedirs(args.root, exist_ok=True)
  record = {"args": vars(args), "seconds": {}}

  ae_dir = args.ae or os.path.join(args.root, "ae")
  if not args.ae:
    c = shapes_autoencoder.get_config("")
    c.train.num_steps, c.checkpoint.every, c.seed = args.ae_steps, args.ae_steps, args.seed
    record["seconds"]["autoencoder"] = train(c, ae_dir)
  ldm_dir = args.ldm or os.path.join(args.root, "ldm")
  if not args.ldm:
    record["seconds"]["ldm"] = train(uncond_ldm_config(ae_dir, args.ldm_steps, args.seed), ldm_dir)
  clf_dir = os.path.join(args.root, "classifier")
  c = shapes_classifier.get_config("")
  c.diffusion_checkpoint = ldm_dir
  c.train.num_steps, c.checkpoint.every, c.seed = (args.classifier_steps, args.classifier_steps,
                                                   args.seed)
  record["seconds"]["classifier"] = train(c, clf_dir)

  model = ldm_lib.LatentDiffusion.from_checkpoint(ldm_dir)
  classifier = model.load_classifier(clf_dir)
  labels = [k for k in range(shapes_lib.NUM_CLASSES) for _ in range(args.per_class)]
  seeds = list(range(len(labels)))
  record["results"] = []
  print(f"{len(labels)} samples ({args.per_class} per class), DDIM {args.steps} steps")
  print(f"{'scale':>6} {'hit rate':>9} {'object found':>13} {'seconds':>8}")
  for scale in [float(s) for s in args.scales.split(",")]:
    t0 = time.time()
    images = []
    for i in range(0, len(labels), 64):
      kwargs = dict(seeds=seeds[i:i + 64], sampler="ddim", steps=args.steps)
      if scale:
        kwargs.update(labels=labels[i:i + 64], classifier=classifier, classifier_scale=scale)
      else:
        kwargs.update(num_samples=len(kwargs["seeds"]))
      images.append(ldm_lib.to_uint8(sampling.sample(model, **kwargs)))
    hits, found = hit_rate(np.concatenate(images), labels)
    row = {"scale": scale, "hit_rate": hits, "object_found": found,
           "seconds": time.time() - t0}
    record["results"].append(row)
    print(f"{scale:>6g} {hits:>9.3f} {found:>13.3f} {row['seconds']:>8.1f}")
  out = os.path.join(args.root, "classifier_guidance.json")
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"Wrote {out}")


if __name__ == "__main__":
  main()
