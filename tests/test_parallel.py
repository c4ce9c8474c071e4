"""Mesh construction, FSDP sharding rules, sharded init, distributed no-op."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax import parallel


def test_make_mesh_absorbs_remaining_devices():
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 2, 'tensor': 1})
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  mesh = parallel.make_mesh({'fsdp': 4}, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {'fsdp': 4}


@pytest.mark.parametrize('axes, match', [
    ({'data': 3, 'fsdp': 2}, r"'data': 3, 'fsdp': 2.*product of sizes is 6 "
                             r'but there are 8 devices'),
    ({'data': -1, 'fsdp': 3}, r'multiply to 3.*device count 8'),
    ({'data': -1, 'fsdp': -1}, r'at most one axis may be -1'),
    ({'data': 0}, r'sizes must be >= 1'),
])
def test_make_mesh_errors_name_axes_and_counts(axes, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(axes)


def test_fsdp_spec_rules():
  # Largest dimension divisible by the fsdp size; ties go to the last one.
  assert parallel.fsdp_spec((3, 3, 128, 256), 4, 64) == P(None, None, None,
                                                          'fsdp')
  assert parallel.fsdp_spec((512, 256), 4, 64) == P('fsdp', None)
  assert parallel.fsdp_spec((64, 64), 4, 64) == P(None, 'fsdp')
  assert parallel.fsdp_spec((1026, 8, 4), 4, 64) == P(None, 'fsdp', None)
  # Replicated: too small, nothing divisible, or no fsdp axis.
  assert parallel.fsdp_spec((8, 7), 4, 64) == P()
  assert parallel.fsdp_spec((5, 7, 9), 4, 64) == P()
  assert parallel.fsdp_spec((), 4, 0) == P()
  assert parallel.fsdp_spec((256, 256), 1, 64) == P()
  assert parallel.fsdp_spec((128, 127), 4) == P()  # Default min 2**14.
  assert parallel.fsdp_spec((128, 128), 4) == P(None, 'fsdp')


def test_infer_shardings_on_optimizer_state():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})
  params = {'w': jnp.zeros((16, 32)), 'b': jnp.zeros((32,))}
  opt_state = optax.adamw(1e-3).init(params)
  tree = (params, opt_state)
  abstract = jax.eval_shape(lambda: tree)
  shard = parallel.infer_param_shardings(abstract, mesh, min_size=64)
  assert jax.tree.structure(shard) == jax.tree.structure(abstract)
  specs = {jax.tree_util.keystr(k): s.spec
           for k, s in jax.tree_util.tree_leaves_with_path(shard)}
  w_specs = [s for k, s in specs.items() if "['w']" in k]
  b_specs = [s for k, s in specs.items() if "['b']" in k]
  assert len(w_specs) == 3 and all(s == P(None, 'fsdp') for s in w_specs)
  assert b_specs and all(s == P() for s in b_specs)
  counts = [s for k, s in specs.items() if 'count' in k]
  assert counts and all(s == P() for s in counts)


def test_init_sharded_births_shards_on_devices():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})

  def init(rng):
    return {'k': jax.random.normal(rng, (8, 64)), 'b': jnp.ones((4,))}

  out = parallel.init_sharded(init, jax.random.PRNGKey(0), mesh=mesh,
                              min_size=64)
  assert out['k'].sharding.spec == P(None, 'fsdp')
  assert {s.data.shape for s in out['k'].addressable_shards} == {(8, 16)}
  assert out['b'].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(out['k']),
                                np.asarray(init(jax.random.PRNGKey(0))['k']))


def test_batch_sharding_spec():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert parallel.batch_sharding(mesh).spec == P(('data', 'fsdp'))
  x = parallel.make_global_batch({'x': np.arange(8.0).reshape(8, 1)}, mesh)
  # 4 batch shards, each on the 2 'tensor' devices.
  shapes = {s.data.shape for s in x['x'].addressable_shards}
  assert shapes == {(2, 1)} and len(x['x'].addressable_shards) == 8


def test_distributed_is_noop_for_one_process(monkeypatch):
  for var in ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
              'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES',
              'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed('localhost:1234', 1, 0) is False
  with pytest.raises(ValueError, match='num_processes=None'):
    parallel.maybe_initialize_distributed('localhost:1234')
  assert parallel.is_main_process()
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host-a,host-b')
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: called.append(kw))
  assert parallel.maybe_initialize_distributed() is True
  assert called == [{}]  # Auto-detection left to JAX on a TPU pod.
