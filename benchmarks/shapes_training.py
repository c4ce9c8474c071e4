"""Training-quality benchmark on the built-in shapes dataset (a benchmark, not a test).

Two modes.

Quickstart workdirs (the default): for existing workdirs, or after training them, reports
  * the KL-f4 autoencoder's reconstruction PSNR on 256 shapes images it never saw (another seed),
    and how often the shapes detector still reads colour / shape / position correctly after the
    round trip (the ceiling any LDM on these latents can reach);
  * the loss of the text- and class-conditional LDMs at their start and end (mean of the first and
    last 10% of logged steps), from each workdir's metrics.jsonl, and the wall time of each run.

Robustness (`--seeds 0,1,2`): trains the quickstart recipe (autoencoder + text LDM) once per
training seed under `--root`, samples each model with its own recommended settings (those saved in
its config, as `sample.py --prompt` does) and grades with the shapes detector
  * the 16 README prompts (configs/shapes_prompts.txt), one sample each, and
  * every colour x shape x position prompt (6 x 3 x 5 = 90), two sampling seeds each;
then prints one row per training seed and the min / median over seeds, and writes `seeds.json`.

Autoencoder only (`--seeds 0,1,2 --ae_only`): stage 1 per training seed, graded by its held-out
round trips at every kept checkpoint (the learning curve) and at the end; writes `ae_seeds.json`.
`--ae_flag` passes a train.py flag to these runs, to try a recipe without editing the config.

  python benchmarks/shapes_training.py                      # quickstart workdirs (train if missing)
  python benchmarks/shapes_training.py --class_ldm          # also train configs/shapes_ldm_class.py
  python benchmarks/shapes_training.py --seeds 0,1,2 --root workdirs/shapes_seeds
  python benchmarks/shapes_training.py --seeds 0,1,2 --ae_only --root workdirs/ae_seeds \
      --ae_flag=--config.train.num_steps=1000
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

from ldm_jax.evaluate_shapes import METRICS  # noqa: E402  (after the repository is on the path)

AE_CONFIG = os.path.join(ROOT, "configs/shapes_autoencoder.py")
TEXT_CONFIG = os.path.join(ROOT, "configs/shapes_ldm_text.py")
README_PROMPTS = os.path.join(ROOT, "configs/shapes_prompts.txt")
# The robustness goal of the quickstart recipe: the worst training seed on the 90 prompts.
GOAL_90 = {"color": 0.90, "shape": 0.90, "position": 0.95, "all": 0.85}


def train_if_missing(config: str, workdir: str, *flags: str) -> float | None:
  """Runs train.py unless `workdir` already has a summary; returns the wall time it took."""
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return None
  t0 = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config,
                  "--workdir", workdir, *flags], check=True, cwd=ROOT)
  return time.time() - t0


def load_config(config_path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", config_path)
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  return cfg.get_config()


def checkpoint_params(workdir: str, step: int) -> dict:
  """The autoencoder variables of checkpoint `step` of a stage-1 workdir."""
  import jax
  from ldm_jax.train import workdir as workdir_lib
  ckptr = workdir_lib.read_checkpoints(workdir)
  try:
    state, _ = ckptr.restore(step)
  finally:
    ckptr.close()
  return {"params": jax.tree.map(np.asarray, state["params"]["autoencoder"])}


def checkpoint_steps(workdir: str) -> list[int]:
  from ldm_jax.train import workdir as workdir_lib
  ckptr = workdir_lib.read_checkpoints(workdir)
  try:
    return ckptr.all_steps() if ckptr is not None else []
  finally:
    if ckptr is not None:
      ckptr.close()


def autoencoder_quality(workdir: str, config_path: str, n: int = 256, step: int | None = None
                        ) -> dict:
  """PSNR and detector agreement of autoencoder round trips on `n` held-out shapes images
  (the newest checkpoint, or checkpoint `step`)."""
  import jax
  import jax.numpy as jnp
  from ldm_jax import ldm as ldm_lib
  from ldm_jax.data import shapes
  from ldm_jax.data import shapes_detect
  from ldm_jax.models import build
  from ldm_jax.train import ae_trainer
  config = load_config(config_path)
  # The workdir's own first-stage config: an --ae_flag may have changed the network.
  ae = build.build_first_stage(ae_trainer.read_first_stage_config(workdir))
  variables = (ae_trainer.load_autoencoder(workdir) if step is None
               else checkpoint_params(workdir, step))
  examples = [shapes.render_shapes(12345, i, size=config.data.image_size) for i in range(n)]
  images = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0

  @jax.jit
  def reconstruct(x):
    return ae.apply(variables, ae.apply(variables, x, method=ae.encode).mode(), method=ae.decode)

  recon = np.concatenate([np.asarray(reconstruct(jnp.asarray(images[i:i + 32])))
                          for i in range(0, n, 32)])
  hits = {k: [] for k in METRICS}
  for ex, img in zip(examples, ldm_lib.to_uint8(recon)):
    want = shapes_detect.parse_caption(ex["caption"])[0]
    found = shapes_detect.detect_shapes(img)
    got = (found[0]["color"], found[0]["shape"], found[0]["position"]) if found else (None,) * 3
    for k, a, b in zip(METRICS, want, got):
      hits[k].append(a == b)
    hits["all"].append(tuple(got) == tuple(want) and len(found) == 1)
  out = {"psnr_db": float(ae_trainer.psnr(jnp.asarray(images), jnp.asarray(recon)))}
  out.update({f"detector_{k}": float(np.mean(v)) for k, v in hits.items()})
  return out


def loss_start_end(workdir: str) -> tuple[float, float, int]:
  from ldm_jax.train import loop
  rows = loop.read_metrics(workdir)
  steps = sorted(rows)
  k = max(1, len(steps) // 10)
  start = float(np.mean([rows[s]["loss"] for s in steps[:k]]))
  end = float(np.mean([rows[s]["loss"] for s in steps[-k:]]))
  return start, end, steps[-1]


def sample_and_grade(checkpoint: str, prompt_file: str, outdir: str, num_samples: int,
                     *flags: str) -> dict:
  """sample.py with the model's own sampling settings (plus `flags`), then the detector's grades."""
  from ldm_jax import evaluate_shapes
  if not os.path.exists(os.path.join(outdir, "samples.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", checkpoint,
                    "--prompt_file", prompt_file, "--num_samples", str(num_samples),
                    "--batch_size", "90", "--outdir", outdir, "--no_progress", *flags],
                   check=True, cwd=ROOT)
  result = evaluate_shapes.grade(outdir)
  with open(os.path.join(outdir, "match.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result["summary"]


def run_seed(seed: int, root: str, ldm_flags: list[str], sample_flags: list[str],
             ae_flags: list[str]) -> dict:
  """Trains (or reuses) one seed's autoencoder and text LDM and grades both prompt sets."""
  from ldm_jax import evaluate_shapes
  base = os.path.join(root, f"seed{seed}")
  ae_dir, ldm_dir = os.path.join(base, "ae"), os.path.join(base, "ldm")
  row = {"seed": seed}
  row["autoencoder_seconds"] = train_if_missing(AE_CONFIG, ae_dir, f"--config.seed={seed}",
                                                *ae_flags)
  row["ldm_seconds"] = train_if_missing(TEXT_CONFIG, ldm_dir, f"--config.seed={seed}",
                                        f"--config.first_stage_checkpoint={ae_dir}", *ldm_flags)
  row["autoencoder"] = autoencoder_quality(ae_dir, AE_CONFIG)
  row["ldm_loss_start"], row["ldm_loss_end"], row["ldm_steps"] = loss_start_end(ldm_dir)
  prompts_90 = os.path.join(base, "prompts_90.txt")
  with open(prompts_90, "w") as f:
    f.write("\n".join(evaluate_shapes.every_prompt()) + "\n")
  row["readme_16"] = sample_and_grade(ldm_dir, README_PROMPTS, os.path.join(base, "readme_16"), 1,
                                      *sample_flags)
  row["all_90x2"] = sample_and_grade(ldm_dir, prompts_90, os.path.join(base, "all_90x2"), 2,
                                     *sample_flags)
  return row


def fmt(summary: dict) -> str:
  return " ".join(f"{k} {summary[k]:4.0%}" for k in METRICS)


def autoencoder_seeds(args) -> dict:
  """Stage 1 alone per training seed: round-trip grades along the run and at its end."""
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  rows = []
  for seed in seeds:
    ae_dir = os.path.join(args.root, f"seed{seed}", "ae")
    row = {"seed": seed, "autoencoder_seconds": train_if_missing(
        AE_CONFIG, ae_dir, f"--config.seed={seed}", *(args.ae_flag or []))}
    row["curve"] = {step: autoencoder_quality(ae_dir, AE_CONFIG, step=step)
                    for step in checkpoint_steps(ae_dir)}
    row["final"] = autoencoder_quality(ae_dir, AE_CONFIG)
    rows.append(row)
    curve = " ".join(f"{step}: {q['detector_all']:.1%}" for step, q in row["curve"].items())
    final = row["final"]
    print(f"seed {seed}: PSNR {final['psnr_db']:.1f} dB | round trip "
          + " ".join(f"{k} {final['detector_' + k]:.1%}" for k in METRICS)
          + f" | all along the run: {curve}", flush=True)
  report = {"seeds": rows, "ae_flags": args.ae_flag or []}
  for k in ("psnr_db",) + tuple(f"detector_{m}" for m in METRICS):
    values = [r["final"][k] for r in rows]
    report[f"min_{k}"], report[f"median_{k}"] = min(values), float(np.median(values))
  print("min over seeds: " + " ".join(f"{m} {report['min_detector_' + m]:.1%}" for m in METRICS)
        + f" | PSNR {report['min_psnr_db']:.1f} dB")
  with open(os.path.join(args.root, "ae_seeds.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def robustness(args) -> dict:
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  rows = [run_seed(s, args.root, args.ldm_flag or [], args.sample_flag or [], args.ae_flag or [])
          for s in seeds]
  report = {"seeds": rows, "ae_flags": args.ae_flag or [], "ldm_flags": args.ldm_flag or [],
            "sample_flags": args.sample_flag or []}
  for name in ("readme_16", "all_90x2"):
    report[f"{name}_min"] = {k: min(r[name][k] for r in rows) for k in METRICS}
    report[f"{name}_median"] = {k: float(np.median([r[name][k] for r in rows])) for k in METRICS}
  report["goal_met"] = all(report["all_90x2_min"][k] >= v for k, v in GOAL_90.items())
  for r in rows:
    secs = [r[k] for k in ("autoencoder_seconds", "ldm_seconds") if r[k] is not None]
    trained = f"trained in {sum(secs):.0f} s" if secs else "trained earlier"
    print(f"seed {r['seed']}: 16 README prompts: {fmt(r['readme_16'])} | 90 prompts x 2: "
          f"{fmt(r['all_90x2'])} | AE round trip all {r['autoencoder']['detector_all']:.1%} | "
          f"{trained}")
  for name, label in (("readme_16", "16 README prompts"), ("all_90x2", "90 prompts x 2")):
    print(f"{label}: min {fmt(report[name + '_min'])} | median {fmt(report[name + '_median'])}")
  print("goal (worst seed, 90 prompts: colour/shape >= 90%, position >= 95%, all >= 85%): "
        + ("met" if report["goal_met"] else "NOT met"))
  with open(os.path.join(args.root, "seeds.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ae_workdir", default=os.path.join(ROOT, "workdirs/shapes_ae"))
  p.add_argument("--text_workdir", default=os.path.join(ROOT, "workdirs/shapes_ldm"))
  p.add_argument("--class_workdir", default=os.path.join(ROOT, "workdirs/shapes_ldm_class"))
  p.add_argument("--class_ldm", action="store_true", help="also train/report the class LDM")
  p.add_argument("--class_steps", type=int, default=0, help="override its num_steps (0: config)")
  p.add_argument("--seeds", default="", help="robustness mode: comma-separated training seeds")
  p.add_argument("--root", default=os.path.join(ROOT, "workdirs/shapes_seeds"),
                 help="robustness mode: one seed<N>/ folder per training seed")
  p.add_argument("--ae_only", action="store_true",
                 help="robustness mode: train and grade only the autoencoder of each seed")
  p.add_argument("--ae_flag", action="append",
                 help="robustness mode: extra train.py flag for the autoencoder (repeatable)")
  p.add_argument("--ldm_flag", action="append",
                 help="robustness mode: extra train.py flag for the LDM (repeatable)")
  p.add_argument("--sample_flag", action="append",
                 help="robustness mode: extra sample.py flag, e.g. --sample_flag=--guidance=5")
  args = p.parse_args()
  if args.seeds:
    os.makedirs(args.root, exist_ok=True)
    (autoencoder_seeds if args.ae_only else robustness)(args)
    return
  results = {}
  results["autoencoder_train_seconds"] = train_if_missing(AE_CONFIG, args.ae_workdir)
  results.update({f"autoencoder_{k}": v
                  for k, v in autoencoder_quality(args.ae_workdir, AE_CONFIG).items()})
  runs = [("text", TEXT_CONFIG, args.text_workdir)]
  if args.class_ldm:
    runs.append(("class", os.path.join(ROOT, "configs/shapes_ldm_class.py"), args.class_workdir))
  for name, cfg, workdir in runs:
    flags = [f"--config.first_stage_checkpoint={args.ae_workdir}"]
    if name == "class" and args.class_steps:
      flags.append(f"--config.train.num_steps={args.class_steps}")
    results[f"{name}_ldm_train_seconds"] = train_if_missing(cfg, workdir, *flags)
    start, end, last = loss_start_end(workdir)
    results[f"{name}_ldm_loss_start"], results[f"{name}_ldm_loss_end"] = start, end
    results[f"{name}_ldm_steps"] = last
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
