"""Checkpointer: round trip, restore onto another mesh, retention, safety."""

import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_train_toy as toy
from ldm_jax import parallel
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import optim
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


def _tx():
  return optim.make_optimizer(learning_rate=1e-2, grad_clip_norm=1.0)


def _fresh_state():
  return state_lib.create_train_state(toy.init_params(), _tx(),
                                      jax.random.PRNGKey(7))


_TRAIN_STEP = step_lib.make_train_step(toy.loss_fn, _tx(), ema_decay=0.99,
                                       donate=False)


def _trained_state(steps=2, seed=0):
  state = _fresh_state()
  for i in range(steps):
    state, _ = _TRAIN_STEP(state, toy.make_batch(seed + i))
  return state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_a_different_mesh(tmp_path):
  mesh_a = parallel.make_mesh({'data': 2, 'fsdp': 4})
  state = parallel.init_sharded(_fresh_state, mesh=mesh_a,
                                min_size=toy.MIN_SIZE)
  train_step = step_lib.make_train_step(
      toy.loss_fn, _tx(), ema_decay=0.99, mesh=mesh_a,
      state_shardings=jax.tree.map(lambda x: x.sharding, state))
  for i in range(2):
    state, _ = train_step(state, parallel.make_global_batch(
        toy.make_batch(i), mesh_a))
  host_copy = jax.device_get(state)
  extra = {'data_iter': {'epoch': 1, 'position': 96}, 'config': {'lr': 0.01}}
  with ckpt_lib.Checkpointer(tmp_path / 'ckpt', max_to_keep=2) as ckpt:
    assert ckpt.save(2, state, extra)
    ckpt.wait()
    assert ckpt.latest_step() == 2

  # A new run, on a pure data-parallel mesh of the same 8 devices.
  mesh_b = parallel.make_mesh({'data': 8, 'fsdp': 1})
  abstract = jax.eval_shape(_fresh_state)
  target = ckpt_lib.abstract_like(
      abstract, parallel.infer_param_shardings(abstract, mesh_b))
  with ckpt_lib.Checkpointer(tmp_path / 'ckpt') as ckpt:
    restored, extra_back = ckpt.restore(target_state=target)
  assert isinstance(restored, state_lib.TrainState)
  _assert_trees_equal(restored, host_copy)
  assert extra_back == extra
  assert int(restored.step) == 2 and int(restored.ema_num_updates) == 2
  kernel = restored.params['conv2']['kernel']
  assert kernel.sharding.mesh.shape == mesh_b.shape
  assert kernel.sharding.spec == jax.sharding.PartitionSpec()  # fsdp=1.
  # The EMA really differs from the params (the round trip is not trivial).
  assert not np.allclose(np.asarray(restored.ema_params['fc1']['kernel']),
                         np.asarray(restored.params['fc1']['kernel']))


def test_keep_last_k_and_save_interval(tmp_path):
  state = _fresh_state()
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=2,
                             async_save=False) as ckpt:
    saved = [ckpt.save(s, state.replace(step=jnp.int32(s)), {'s': s})
             for s in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.save(7, state, force=True)  # Forced off-interval save ...
    assert not ckpt.save(7, state, force=True)  # ... never overwrites.
    assert ckpt.all_steps() == [6, 7]
    restored, extra = ckpt.restore(6, target_state=state)
    assert int(restored.step) == 6 and extra == {'s': 6}
    with pytest.raises(FileNotFoundError, match=r'step=4 not found.*\[6, 7\]'):
      ckpt.restore(4, target_state=state)


def test_partial_and_tmp_directories_are_ignored(tmp_path):
  state = _trained_state()
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, {'ok': True})
  # What a crash mid-save leaves: Orbax's tmp dir, or a half-copied step.
  for name in ('5.orbax-checkpoint-tmp', '6.orbax-checkpoint-tmp-1234', '7'):
    (tmp_path / name / 'state').mkdir(parents=True)
    (tmp_path / name / 'state' / 'garbage').write_bytes(b'\x00' * 10)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored, extra = ckpt.restore(target_state=_fresh_state())
    _assert_trees_equal(restored, jax.device_get(state))
    assert extra == {'ok': True}
    with pytest.raises(FileNotFoundError, match='step=7'):
      ckpt.restore(7, target_state=state)


def test_empty_directory_raises(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
      ckpt.restore(target_state=_fresh_state())


class _FileSizeLimit:
  """A real write failure (EFBIG), as a full disk gives, for this process."""

  def __init__(self, limit):
    self.limit = limit

  def __enter__(self):
    self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
    self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

  def __exit__(self, *exc):
    resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
    signal.signal(signal.SIGXFSZ, self.old_handler)


# Tensorstore may report the aborted write after Orbax closed its loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('failure', ['disk_full', 'rename_fails'])
@pytest.mark.parametrize('async_save', [True, False])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch,
                                                failure, async_save):
  good = _trained_state(steps=1)
  newer = _trained_state(steps=2, seed=5)
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=async_save)
  ckpt.save(1, good, {'step': 1})
  ckpt.wait()

  if failure == 'disk_full':
    guard = _FileSizeLimit(8192)  # The state's data file is ~47 kB.
  else:
    # The last act of a save: all data written, then the commit fails.
    from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

    async def broken_rename(*args, **kwargs):
      raise OSError(28, 'No space left on device')

    monkeypatch.setattr(async_path, 'rename', broken_rename)
    guard = None
  with pytest.raises(ckpt_lib.CheckpointSaveError, match='step 2') as err:
    if guard:
      with guard:
        ckpt.save(2, newer, {'step': 2})
        ckpt.wait()
    else:
      ckpt.save(2, newer, {'step': 2})
      ckpt.wait()
  assert 'latest complete step: 1' in str(err.value)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1']  # No leftovers.

  # The old checkpoint is intact, from this manager and from a fresh one.
  assert ckpt.latest_step() == 1
  restored, extra = ckpt.restore(target_state=_fresh_state())
  _assert_trees_equal(restored, jax.device_get(good))
  assert extra == {'step': 1}
  # And saving works again once the disk has room.
  assert ckpt.save(3, newer, {'step': 3})
  ckpt.close()
  with ckpt_lib.Checkpointer(tmp_path) as fresh:
    assert fresh.all_steps() == [1, 3]
    restored, _ = fresh.restore(target_state=_fresh_state())
    _assert_trees_equal(restored, jax.device_get(newer))
