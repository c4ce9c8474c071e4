"""Where things live in a training workdir and in a saved model directory; the names' one owner.

A saved model directory (`LatentDiffusion.save`, `python -m ldm_jax.convert`):

    config.json          the model config (first_stage, unet, cond_stage, diffusion)
    params/              Orbax tree {first_stage, unet, cond_stage}

A training workdir (train.py):

    config.json          the resolved experiment config
    checkpoints/<step>/  Orbax training checkpoints: items state/ (the TrainState) and extra/ (JSON)
    model/               stage 2: a saved model directory, written when training starts
    lora.json            stage 2 with config.lora: the frozen base's path and the adapters' shape
                         (such a workdir has no model/: its checkpoints hold the adapters only)
    first_stage.json     stage 1: the autoencoder's config
    classifier.json      noisy-latent classifier: its network and the latent space it reads
    metrics.jsonl        one JSON line of metrics per logged step
    summary.json         the last step's metrics
    samples/             stage 2: sample grids, step_NNNNNNN.png
    eval/                stage 2: sample-and-evaluate results, step_NNNNNNN.json
    trainer.lock         the running trainer's lock (train/workdir.py)

Training writes these, sampling, evaluation and conversion read them; all of them take the names
from here. Paths are plain strings (os.path), so object-store URLs (gs://...) pass through.
"""

import os

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
FIRST_STAGE_FILE = "first_stage.json"
CLASSIFIER_FILE = "classifier.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLES_DIR = "samples"
EVAL_DIR = "eval"
LOCK_FILE = "trainer.lock"
LORA_FILE = "lora.json"
SWEEP_SUMMARY_FILE = "sweep_summary.txt"  # In a sweep's parent directory, beside its runs.

# Inside one checkpoint step directory.
STATE_ITEM = "state"
EXTRA_ITEM = "extra"
STEP_DONE_FILE = "_CHECKPOINT_METADATA"  # Orbax writes it last, into every finished step.


def config_path(root: str) -> str:
  """config.json of a saved model directory or of a training workdir."""
  return os.path.join(root, CONFIG_FILE)


def params_dir(model_dir: str) -> str:
  return os.path.join(model_dir, PARAMS_DIR)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def model_dir(workdir: str) -> str:
  """The saved model directory inside a stage-2 workdir."""
  return os.path.join(workdir, MODEL_DIR)


def first_stage_path(workdir: str) -> str:
  return os.path.join(workdir, FIRST_STAGE_FILE)


def classifier_path(workdir: str) -> str:
  """classifier.json of a noisy-latent classifier's training workdir."""
  return os.path.join(workdir, CLASSIFIER_FILE)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def summary_path(workdir: str) -> str:
  return os.path.join(workdir, SUMMARY_FILE)


def lora_path(workdir: str) -> str:
  return os.path.join(workdir, LORA_FILE)


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def sample_grid_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, SAMPLES_DIR, f"step_{step:07d}.png")


def eval_result_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, EVAL_DIR, f"step_{step:07d}.json")


def is_saved_model(path: str) -> bool:
  """Whether `path` looks like a saved model directory (it has params/)."""
  return os.path.isdir(params_dir(path))


def is_autoencoder_workdir(path: str) -> bool:
  """Whether `path` is a stage-1 training workdir (it has first_stage.json)."""
  return os.path.isfile(first_stage_path(path))
