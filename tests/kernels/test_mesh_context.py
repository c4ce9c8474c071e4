"""`platform.mesh_context`: TPU programs are traced with their mesh (the Pallas attention needs it),
other platforms' programs as before."""

import contextlib

import jax
import numpy as np

from ldm_jax.kernels import platform


def test_tpu_mesh_sets_the_abstract_mesh_and_cpu_mesh_sets_nothing(tpu_v5e_devices):
  tpu = jax.sharding.Mesh(np.array(tpu_v5e_devices).reshape(4, 1), ("data", "fsdp"))
  with platform.mesh_context(tpu):
    assert jax.sharding.get_abstract_mesh() == tpu.abstract_mesh
  assert jax.sharding.get_abstract_mesh() != tpu.abstract_mesh  # Left again on exit.
  cpu = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]).reshape(2, 1), ("data", "fsdp"))
  assert isinstance(platform.mesh_context(cpu), contextlib.nullcontext)
  assert isinstance(platform.mesh_context(None), contextlib.nullcontext)
