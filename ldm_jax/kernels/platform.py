"""The one place where a kernel's implementation is chosen by platform.

A computation runs on the devices it is compiled for, which need not be `jax.default_backend()`:
a TPU program compiled ahead of time on a CPU host, or a CPU mesh beside an accelerator. So the
choice is made when the computation is lowered, with `jax.lax.platform_dependent`: every branch
is traced, and lowering for one platform keeps only that platform's branch (a TPU program built
on a CPU host holds none of the CPU kernels' loops; tests/kernels/test_platform.py).
"""

import contextlib
from typing import Any, Callable

import jax
import numpy as np

# Platform names as jax.lax.platform_dependent spells them; "default" is every other platform.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def by_platform(*args: Any, cpu: Callable[..., Any] | None = None,
                tpu: Callable[..., Any] | None = None, gpu: Callable[..., Any] | None = None,
                default: Callable[..., Any]) -> Any:
  """default(*args), or the branch named for the platform the computation is lowered for.

  All branches must take the same arguments and return the same shapes and dtypes. `gpu` covers
  CUDA and ROCm.
  """
  branches = {}
  if cpu is not None:
    branches["cpu"] = cpu
  if tpu is not None:
    branches["tpu"] = tpu
  if gpu is not None:
    branches["cuda"] = branches["rocm"] = gpu
  if not branches:
    return default(*args)
  return jax.lax.platform_dependent(*args, default=default, **branches)


def mesh_context(mesh: jax.sharding.Mesh | None):
  """The context to trace a program for `mesh` in, so kernels that must know the mesh find it.

  TPU attention runs its Pallas kernel under shard_map over the traced mesh (XLA cannot partition
  a Pallas call itself); without this context TPU programs keep the one-block einsum attention.
  Only the abstract mesh is set, so host-side computations while tracing stay on the host. Other
  platforms' kernels need no mesh, and their programs are traced as before.
  """
  if mesh is None or mesh.devices.flat[0].platform != "tpu":
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def devices_context(*trees: Any):
  """`mesh_context` for the devices the arrays of `trees` are on, for a call made outside any
  trace: the mesh of their NamedShardings, or a one-device mesh when every array is on one device
  or on the host (the default device). Inside a trace (tracers), or with arrays on different
  meshes, no context: the enclosing program's, if any, applies.
  """
  meshes, devices = set(), set()
  for leaf in jax.tree.leaves(trees):
    if isinstance(leaf, jax.core.Tracer):
      return contextlib.nullcontext()
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      meshes.add(sharding.mesh)
    elif isinstance(leaf, jax.Array):
      devices |= leaf.devices()
  if len(meshes) == 1:
    mesh = meshes.pop()
    return mesh_context(mesh) if devices <= set(mesh.devices.flat) else contextlib.nullcontext()
  if meshes or len(devices) > 1:
    return contextlib.nullcontext()
  device = devices.pop() if devices else jax.local_devices()[0]
  return mesh_context(jax.sharding.Mesh(np.array([device]), ("data",)))
