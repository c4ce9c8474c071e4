"""Device mesh, FSDP parameter shardings and global batches.

One mesh with named axes serves every model: 'data' (pure data parallelism),
'fsdp' (data parallelism whose replicas also split the parameters and the
optimizer state, ZeRO-3 style) and 'tensor' (reserved for model parallelism;
nothing is sharded over it yet). The batch's leading axis is split over
('data', 'fsdp'); each parameter is split over 'fsdp' along its largest
dimension that the fsdp size divides.

Typical use, as in big_vision: parameters are born sharded,

  mesh = make_mesh({'data': -1, 'fsdp': 4})
  state = init_sharded(create_state_fn, rng, mesh=mesh)
  batch = make_global_batch(local_numpy_batch, mesh)
"""

import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

# Arrays with fewer elements than this stay replicated: sharding them saves
# little memory and costs an all-gather per use.
DEFAULT_MIN_SHARD_SIZE = 2**14
BATCH_AXES = ('data', 'fsdp')


def count_params(tree: Any) -> int:
  """Number of scalars in a parameter tree, also of an abstract one (ShapeDtypeStruct leaves)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def make_mesh(axes: Mapping[str, int],
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds a mesh from ordered {axis_name: size}; one size may be -1.

  Args:
    axes: e.g. {'data': -1, 'fsdp': 4, 'tensor': 1}; -1 takes the devices
      left over after the other axes.
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` whose axis names are the keys of `axes`, in order.

  Raises:
    ValueError: on more than one -1, a size < 1, or sizes whose product is not
      the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(axes)
  sizes = [int(s) for s in axes.values()]
  if not names:
    raise ValueError('mesh axes: expected at least one axis, got {}')
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f'mesh axes {dict(axes)}: at most one axis may be -1, '
                     f'got {len(free)}')
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f'mesh axes {dict(axes)}: sizes must be >= 1 or -1')
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(
          f'mesh axes {dict(axes)}: the fixed axes multiply to {fixed}, which '
          f'does not divide the device count {len(devices)}')
    sizes[free[0]] = len(devices) // fixed
  total = int(np.prod(sizes))
  if total != len(devices):
    raise ValueError(
        f'mesh axes {dict(axes)}: product of sizes is {total} but there are '
        f'{len(devices)} devices; use -1 on one axis to absorb the rest')
  try:
    # Topology-aware placement (ICI rings on TPU); plain reshape elsewhere.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names)


def _axis_size(mesh: Mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.axis_names else 1


def fsdp_spec(shape: Sequence[int], fsdp_size: int,
              min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
  """PartitionSpec sharding the largest fsdp-divisible dimension over 'fsdp'.

  Replicated (P()) when fsdp_size is 1, the array has fewer than `min_size`
  elements, or no dimension is divisible by fsdp_size. Ties between equal
  dimensions go to the last one (the output-channel axis of HWIO kernels).
  """
  shape = tuple(int(d) for d in shape)
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for i, d in enumerate(shape):
    if d % fsdp_size == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def infer_param_shardings(tree: Any, mesh: Mesh,
                          min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
  """Tree of NamedSharding for any pytree of arrays or ShapeDtypeStructs.

  Works on parameters, optax states, EMA copies or a whole TrainState: every
  leaf with a `.shape` follows `fsdp_spec`; scalars and leaves without a shape
  are replicated.
  """
  fsdp = _axis_size(mesh, 'fsdp')

  def one(leaf):
    shape = getattr(leaf, 'shape', ())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

  return jax.tree.map(one, tree)


# The spec's name for the same rule, kept for readability at call sites.
param_sharding_rules = fsdp_spec


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'), the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding (scalars, metrics)."""
  return NamedSharding(mesh, P())


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's numpy batch into global, batch-sharded arrays.

  Args:
    local_batch: pytree of numpy arrays [B_local, ...], this process's share.
      B_local must be divisible by the process's number of batch shards.

  Returns:
    The same pytree of `jax.Array`s of shape [B_local * num_processes, ...].
  """
  sharding = batch_sharding(mesh)
  n_local = mesh.local_mesh.size // _axis_size(mesh.local_mesh, 'tensor')

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise ValueError(
          f'batch field {jax.tree_util.keystr(path)}: leading size '
          f'{x.shape[:1]} must be divisible by the {n_local} local batch '
          'shards of this process')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(one, local_batch)


def init_sharded(init_fn: Callable[..., Any], *args: Any, mesh: Mesh,
                 min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
  """Runs `init_fn(*args)` so its outputs are born sharded (never gathered).

  The output shapes come from `jax.eval_shape`, the shardings from
  `infer_param_shardings`, and the jitted init writes each shard straight to
  its device. Get the shardings back with
  `jax.tree.map(lambda x: x.sharding, out)`.
  """
  shardings = jax.tree.map(lambda a: a.sharding,
                           abstract_sharded(init_fn, *args, mesh=mesh, min_size=min_size))
  return jax.jit(init_fn, out_shardings=shardings)(*args)


def abstract_sharded(init_fn: Callable[..., Any], *args: Any, mesh: Mesh,
                     min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
  """What `init_sharded` would return, as ShapeDtypeStructs carrying their shardings.

  Nothing is allocated: `args` may themselves be ShapeDtypeStructs. Ahead-of-time compilation
  lowers a step on these, so its state is laid out exactly as a training run's.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = infer_param_shardings(abstract, mesh, min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _multiprocess_env() -> bool:
  """True when the environment says this run spans several processes."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return True  # Cloud TPU pod slice.
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True  # Multi-slice TPU.
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES'):
    if int(os.environ.get(var, '1') or 1) > 1:
      return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))


def maybe_initialize_distributed(coordinator: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when the run spans processes.

  Explicit arguments win (all three, e.g. from CLI flags); otherwise TPU pods,
  SLURM and Open MPI are detected from the environment and JAX auto-detects
  the coordinator, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID give them. A single process is a no-op. Must run before anything
  touches the devices.

  Returns:
    True if distributed JAX was initialised (now or earlier).
  """
  if jax.distributed.is_initialized():
    return True
  explicit = (coordinator, num_processes, process_id)
  if any(a is not None for a in explicit):
    if any(a is None for a in explicit):
      raise ValueError(
          'distributed flags: coordinator, num_processes and process_id must '
          f'be given together, got coordinator={coordinator!r}, '
          f'num_processes={num_processes!r}, process_id={process_id!r}')
    if int(num_processes) <= 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(num_processes),
                               process_id=int(process_id))
  elif _multiprocess_env():
    # jax.distributed reads JAX_COORDINATOR_ADDRESS itself but not these two, which
    # _multiprocess_env accepts; pass them on so a plain multi-process launch (no cluster
    # manager to auto-detect, e.g. several processes on one machine) works.
    env = {k: int(os.environ[v]) for k, v in
           (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID'))
           if os.environ.get(v)}
    jax.distributed.initialize(**env)
  else:
    return False
  logging.info('jax.distributed initialised: process %d of %d',
               jax.process_index(), jax.process_count())
  return True


def is_main_process() -> bool:
  """True on the process that logs, writes summaries and exports."""
  return jax.process_index() == 0
