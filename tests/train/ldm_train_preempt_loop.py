"""A minimal train loop for the SIGTERM test: resume, train, save on signal.

Usage: python ldm_train_preempt_loop.py WORKDIR MAX_STEPS
Prints RESUMED <step>, READY, STEP <n> per step, SAVED <step> <checksum>,
DONE <step> <checksum>.
"""

import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import ldm_train_toy as toy  # pylint: disable=g-import-not-at-top
from ldm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from ldm_jax.train import optim  # pylint: disable=g-import-not-at-top
from ldm_jax.train import preemption  # pylint: disable=g-import-not-at-top
from ldm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
from ldm_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top


def checksum(state):
  return float(sum(np.abs(np.asarray(x, np.float64)).sum()
                   for x in jax.tree.leaves(state.params)))


def main(workdir, max_steps):
  tx = optim.make_optimizer(learning_rate=1e-3)
  state = state_lib.create_train_state(toy.init_params(), tx,
                                       jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(toy.loss_fn, tx, ema_decay=0.999)
  with preemption.PreemptionGuard() as guard, ckpt_lib.Checkpointer(
      workdir, save_every=10**6) as ckpt:
    if ckpt.latest_step() is not None:
      state, extra = ckpt.restore(target_state=state)
      assert extra['step'] == int(state.step), extra
      print('RESUMED', int(state.step), checksum(state), flush=True)
    print('READY', flush=True)
    while int(state.step) < max_steps:
      state, metrics = train_step(state, toy.make_batch(int(state.step)))
      step_lib.check_finite(metrics, int(state.step) - 1)
      step = int(state.step)
      if guard.should_stop(step):
        ckpt.save(step, state, {'step': step}, force=True)
        ckpt.wait()
        print('SAVED', step, checksum(state), flush=True)
        return
      print('STEP', step, flush=True)
      time.sleep(0.05)
  print('DONE', int(state.step), checksum(state), flush=True)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
