"""Test set-up: CPU only, with 8 fake devices so sharding tests can build meshes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Tests run tiny models, where XLA's compile time dwarfs run time: skip its expensive LLVM passes.
# (Test-only; the package and its CLIs use XLA's defaults.)
for _flag in ("--xla_llvm_disable_expensive_passes=true",
              "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CLIs run in-process must not write JAX's compilation cache into the user's cache directory.
os.environ.setdefault("LDM_JAX_COMPILATION_CACHE", "off")
# sample.py samples on one device unless a test passes --num_devices: sharding has its own tests.
os.environ.setdefault("LDM_JAX_NUM_DEVICES", "1")
# libtpu (the TPU compiler of the topology tests; no TPU is opened) takes a machine-wide lock file
# unless told that several processes load it: the test workers compile for TPUs side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402  (after the environment is set up)

import ldm_jax  # noqa: E402,F401  (sets its XLA:CPU flags before JAX starts)


@pytest.fixture(scope="session")
def tiny_workdirs(tmp_path_factory):
  """A tiny shapes autoencoder and text LDM, each trained 2 steps through the real trainers.

  Returns {'ae': workdir, 'ldm': workdir}; shared by the sampling, CLI and model tests.
  """
  from configs import shapes_autoencoder, shapes_ldm_text
  from ldm_jax.cli import train as entry
  root = tmp_path_factory.mktemp("tiny_models")
  ae_dir, ldm_dir = str(root / "ae"), str(root / "ldm")
  # One device: the sharded paths have their own tests, and 8 fake devices on 2 cores only slow
  # these down.
  cfg = shapes_autoencoder.get_config("tiny")
  cfg.mesh.num_devices = 1
  entry.train(cfg, ae_dir)
  cfg = shapes_ldm_text.get_config("tiny")
  cfg.mesh.num_devices = 1
  cfg.first_stage_checkpoint = ae_dir
  entry.train(cfg, ldm_dir)
  return {"ae": ae_dir, "ldm": ldm_dir}


@pytest.fixture(scope="session")
def tpu_v5e_devices():
  """The 4 devices of a TPU v5e 2x2 topology, to compile for (never run) on this CPU host.

  libtpu (a test requirement, `jax[tpu]`) provides the TPU compiler without a TPU.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
