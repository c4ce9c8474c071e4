"""Training-quality benchmark on the built-in shapes dataset (a benchmark, not a test).

Reports, for existing workdirs (the quickstart's by default), or after training them:
  * the KL-f4 autoencoder's reconstruction PSNR on 256 shapes images it never saw (another seed);
  * the loss of the text- and class-conditional LDMs at their start and end (mean of the first and
    last 10% of logged steps), from each workdir's metrics.jsonl, and the wall time of each run.

  python benchmarks/shapes_training.py                      # quickstart workdirs (train if missing)
  python benchmarks/shapes_training.py --class_ldm          # also train configs/shapes_ldm_class.py
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train_if_missing(config: str, workdir: str, *flags: str) -> float | None:
  """Runs train.py unless `workdir` already has a summary; returns the wall time it took."""
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return None
  t0 = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config,
                  "--workdir", workdir, *flags], check=True, cwd=ROOT)
  return time.time() - t0


def autoencoder_psnr(workdir: str, config_path: str, n: int = 256) -> float:
  import jax
  import jax.numpy as jnp
  from ldm_jax.data import shapes
  from ldm_jax.models import build
  from ldm_jax.train import ae_trainer
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", config_path)
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  config = cfg.get_config()
  ae = build.build_first_stage(config.model.first_stage)
  variables = ae_trainer.load_autoencoder(workdir)
  images = np.stack([shapes.render_shapes(12345, i, size=config.data.image_size)["image"]
                     for i in range(n)]).astype(np.float32) / 127.5 - 1.0

  @jax.jit
  def reconstruct(x):
    return ae.apply(variables, ae.apply(variables, x, method=ae.encode).mode(), method=ae.decode)

  recon = np.concatenate([np.asarray(reconstruct(jnp.asarray(images[i:i + 32])))
                          for i in range(0, n, 32)])
  return float(ae_trainer.psnr(jnp.asarray(images), jnp.asarray(recon)))


def loss_start_end(workdir: str) -> tuple[float, float, int]:
  from ldm_jax.train import loop
  rows = loop.read_metrics(workdir)
  steps = sorted(rows)
  k = max(1, len(steps) // 10)
  start = float(np.mean([rows[s]["loss"] for s in steps[:k]]))
  end = float(np.mean([rows[s]["loss"] for s in steps[-k:]]))
  return start, end, steps[-1]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ae_workdir", default=os.path.join(ROOT, "workdirs/shapes_ae"))
  p.add_argument("--text_workdir", default=os.path.join(ROOT, "workdirs/shapes_ldm"))
  p.add_argument("--class_workdir", default=os.path.join(ROOT, "workdirs/shapes_ldm_class"))
  p.add_argument("--class_ldm", action="store_true", help="also train/report the class LDM")
  p.add_argument("--class_steps", type=int, default=0, help="override its num_steps (0: config)")
  args = p.parse_args()
  results = {}
  ae_cfg = os.path.join(ROOT, "configs/shapes_autoencoder.py")
  results["autoencoder_train_seconds"] = train_if_missing(ae_cfg, args.ae_workdir)
  results["autoencoder_psnr_db"] = autoencoder_psnr(args.ae_workdir, ae_cfg)
  runs = [("text", "configs/shapes_ldm_text.py", args.text_workdir)]
  if args.class_ldm:
    runs.append(("class", "configs/shapes_ldm_class.py", args.class_workdir))
  for name, cfg, workdir in runs:
    flags = [f"--config.first_stage_checkpoint={args.ae_workdir}"]
    if name == "class" and args.class_steps:
      flags.append(f"--config.train.num_steps={args.class_steps}")
    results[f"{name}_ldm_train_seconds"] = train_if_missing(os.path.join(ROOT, cfg), workdir,
                                                            *flags)
    start, end, last = loss_start_end(workdir)
    results[f"{name}_ldm_loss_start"], results[f"{name}_ldm_loss_end"] = start, end
    results[f"{name}_ldm_steps"] = last
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
