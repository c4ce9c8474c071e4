"""Runs a hyper-parameter sweep: one workdir and one clean train.py process per run.

  python sweep.py --config configs/shapes_autoencoder.py:tiny \
      --sweep configs/sweeps/shapes_tiny.py --workdir /tmp/sw            # run all, in sequence
  python sweep.py ... --mode print                                      # only print the commands
  python sweep.py ... --config.train.num_steps=100                      # applies to every run

Each run's workdir is `<workdir>/<name>`, named from its overrides (e.g. `lr=0.0001,bs=4`), with the
resolved `config.json`. Runs whose `summary.json` already reaches train.num_steps are skipped, so
re-running a sweep finishes what is missing. A summary table (final step, loss and metrics, status)
is printed at the end and written to `<workdir>/sweep_summary.txt`. Every override is checked
against the config before anything runs. The logic is ldm_jax/cli/sweep.py and ldm_jax/sweep.py.
"""

from absl import app

from ldm_jax.cli import sweep as cli_sweep

if __name__ == "__main__":
  cli_sweep.define_flags()
  app.run(cli_sweep.main)
