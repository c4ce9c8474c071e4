"""sweep.py: the flags, the exit codes and the printed table of a hyper-parameter sweep.

The sweep itself (building runs, checking overrides, running train.py per run, the table) is
ldm_jax/sweep.py, which sweep files import their helpers from. `define_flags` is kept out of import
time, so importing this module defines no absl flags.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ldm_jax import sweep
from ldm_jax import workdir_layout as layout
from ldm_jax.cli import common as cli
from ldm_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Base experiment config (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("sweep", None, "Sweep definition: a Python file with get_sweep().")
  flags.DEFINE_string("workdir", None, "Parent directory of the runs' workdirs.")
  flags.DEFINE_enum("mode", "run", ["run", "print"], "Run locally in sequence, or print commands.")
  flags.DEFINE_list("metrics", list(sweep.DEFAULT_METRICS), "summary.json fields in the table.")
  flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv) -> None:
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
  except UserError as e:  # SweepError: a bad sweep file or override.
    sys.exit(cli.report("sweep.py", e))
  table = sweep.format_table(runs, status, FLAGS.metrics)
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, layout.SWEEP_SUMMARY_FILE), "w") as f:
    f.write(table + "\n")
  if any(s.startswith("failed") for s in status.values()):
    sys.exit(1)
