"""Stage-2 trainer features beyond the basic loop: init_from, periodic sample grids, the config in
every checkpoint, training from a latent cache; and stage 1's optional learned log-variance."""

import os

import jax
import numpy as np

from configs import shapes_autoencoder, shapes_ldm_text
from ldm_jax import ldm
from ldm_jax import model_io
from ldm_jax.data import latent_cache
from ldm_jax.data import shapes
from ldm_jax.train import checkpoint as checkpoint_lib
from ldm_jax.cli import train as entry


def tiny_text_config(init_from: str):
  cfg = shapes_ldm_text.get_config("tiny")
  cfg.mesh.num_devices = 1
  cfg.init_from = init_from
  cfg.train.num_steps = 1
  cfg.checkpoint.every = 1
  return cfg


def test_init_from_sample_grid_and_config_in_checkpoint(tiny_workdirs, tmp_path):
  source = ldm.LatentDiffusion.from_checkpoint(tiny_workdirs["ldm"])  # EMA weights
  cfg = tiny_text_config(tiny_workdirs["ldm"])
  cfg.log.sample_every = 1
  cfg.log.sample_prompts = ("a red circle at the center",)
  workdir = str(tmp_path / "finetune")
  entry.train(cfg, workdir)
  # The run starts from the source's (EMA) weights and scale factor.
  _, start = model_io.load_saved_model(os.path.join(workdir, model_io.MODEL_SUBDIR))
  for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isfile(os.path.join(workdir, "samples", "step_0000001.png"))
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  ckptr = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  _, extra = ckptr.restore()
  ckptr.close()
  assert extra["config"]["init_from"] == tiny_workdirs["ldm"]
  assert extra["config"]["train"]["num_steps"] == 1


def test_training_from_a_latent_cache(tiny_workdirs, tmp_path):
  model = ldm.LatentDiffusion.from_checkpoint(tiny_workdirs["ldm"])
  cache = str(tmp_path / "cache")
  source = shapes.ShapesSource(seed=0, size=32, length=16)
  latent_cache.build_latent_cache(source, lambda x: np.asarray(model.encode(x)), cache,
                                  shard_size=8, batch_size=8)
  cfg = tiny_text_config(tiny_workdirs["ldm"])
  cfg.data.source = "latent_cache"
  cfg.data.data_dir = cache
  summary = entry.train(cfg, str(tmp_path / "from_cache"))
  assert summary["step"] == 1 and np.isfinite(summary["loss"])


def test_learned_logvar_moves(tmp_path):
  cfg = shapes_autoencoder.get_config("tiny")
  cfg.mesh.num_devices = 1
  cfg.loss.learn_logvar = True
  summary = entry.train(cfg, str(tmp_path / "ae"))
  assert summary["logvar"] != 0.0
