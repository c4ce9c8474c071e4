"""Runs a hyper-parameter sweep: one workdir and one clean train.py process per run.

  python sweep.py --config configs/shapes_autoencoder.py:tiny \
      --sweep configs/sweeps/shapes_tiny.py --workdir /tmp/sw            # run all, in sequence
  python sweep.py ... --mode print                                      # only print the commands
  python sweep.py ... --config.train.num_steps=100                      # applies to every run

Each run's workdir is `<workdir>/<name>`, named from its overrides (e.g. `lr=0.0001,bs=4`), with the
resolved `config.json`. Runs whose `summary.json` already reaches train.num_steps are skipped, so
re-running a sweep finishes what is missing. A summary table (final step, loss and metrics, status)
is printed at the end and written to `<workdir>/sweep_summary.txt`. Every override is checked
against the config before anything runs.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ldm_jax import sweep

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base experiment config (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("sweep", None, "Sweep definition: a Python file with get_sweep().")
flags.DEFINE_string("workdir", None, "Parent directory of the runs' workdirs.")
flags.DEFINE_enum("mode", "run", ["run", "print"], "Run locally in sequence, or print commands.")
flags.DEFINE_list("metrics", list(sweep.DEFAULT_METRICS), "summary.json fields in the table.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides belong in the sweep file")
  # 'path[:variant]' as given, with an absolute path: the runs start in the repository root.
  path, colon, variant = FLAGS["config"].config_filename.partition(":")
  config_arg = os.path.abspath(path) + colon + variant
  # --config.key=value flags given here apply to every run (the sweep's own keys win).
  common = config_flags.get_override_values(FLAGS["config"])
  try:
    runs = sweep.plan(FLAGS.config, sweep.load_sweep(FLAGS.sweep), FLAGS.workdir,
                      common=common)
    status = sweep.run_all(runs, config_arg, mode=FLAGS.mode)
  except sweep.SweepError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  table = sweep.format_table(runs, status, FLAGS.metrics)
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "sweep_summary.txt"), "w") as f:
    f.write(table + "\n")
  if any(s.startswith("failed") for s in status.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
