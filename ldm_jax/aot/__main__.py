"""Compiles a config's train step (and sampling loop) for a TPU topology; prints per-chip figures.

  python -m ldm_jax.aot --config configs/sd_v1_finetune.py --topology v5e:2x4 \
      [--config.mesh.fsdp=8] [--batch_per_chip=4] [--sample] [--json out.json]

Per chip: parameter / optimizer / EMA bytes, XLA's memory analysis (arguments, outputs, donated,
temporaries) and the total against the chip's HBM, FLOPs, XLA's cost-model time, images/s/chip and
MFU, and the compile time; when a step does not fit, by how much and which knobs help. Nothing runs
on a TPU: libtpu's compiler works on this host. A user mistake (unknown topology, impossible
config) is one line on stderr and exit code 2.
"""

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:2x2, v4:2x2x1.")
flags.DEFINE_integer("batch_per_chip", 0, "Train batch per chip (0: config.data.batch_size, "
                     "the global batch).")
flags.DEFINE_bool("sample", False, "Also compile the sampling loop.")
flags.DEFINE_integer("sample_batch_per_chip", 8, "Sampling batch per chip (with --sample).")
flags.DEFINE_integer("sample_steps", 50, "DDIM steps of the sampling loop.")
flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale of the sampling loop (1: "
                   "no guidance; only text and class models have a null condition).")
flags.DEFINE_bool("train", True, "Compile the train step (--notrain: the sampling loop only).")
flags.DEFINE_bool("lower_only", False, "Trace and lower the programs for the topology without "
                  "compiling them: checks shardings, kernels and shapes in seconds; no figures.")
flags.DEFINE_bool("attention_kernel", True, "TPU attention as the Pallas flash kernel "
                  "(--noattention_kernel: the one-block einsum form, to compare).")
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def main(argv) -> int:
  try:
    FLAGS(argv)
    config = FLAGS.config
    if config is not None:  # The file is loaded (and overridden) on first use: here.
      config = config.copy_and_resolve_references()
  except (KeyError, AttributeError) as e:
    print(f"ldm_jax.aot: error: a --config.* override names no field of the config: {e}",
          file=sys.stderr)
    return 2
  except (flags.Error, OSError, ValueError, TypeError) as e:
    # A missing file, an unknown variant, a bad value: the loader's last line (its messages may
    # carry a traceback), on one line.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"ldm_jax.aot: error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
    return 2
  # Progress on stderr (an SD-size compile takes minutes); the report goes to stdout.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("ldm_jax.aot: %(message)s"))
  log = logging.getLogger("ldm_jax.aot")
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False  # absl's root handler would print each line again.
  if config is None or not FLAGS.topology:
    print("ldm_jax.aot: error: --config and --topology are required, e.g. --config "
          "configs/shapes_ldm_text.py:tiny --topology v5e:2x2", file=sys.stderr)
    return 2
  from ldm_jax.aot import analysis, report
  try:
    out = analysis.analyse(config, FLAGS.topology, batch_per_chip=FLAGS.batch_per_chip,
              train=FLAGS.train, sample=FLAGS.sample,
              sample_batch_per_chip=FLAGS.sample_batch_per_chip, sample_steps=FLAGS.sample_steps,
              guidance=FLAGS.guidance, lower_only=FLAGS.lower_only,
              attention_kernel=FLAGS.attention_kernel)
  except analysis.AotError as e:
    print(f"ldm_jax.aot: error: {e}", file=sys.stderr)
    return 2
  print(f"{out['topology']}: {out['num_chips']} {out['chip']} chips, mesh {out['mesh']}, "
        f"{out['compute_dtype']} compute, remat={out['remat']}, {out['attention']} attention")
  for result in out["programs"]:
    if FLAGS.lower_only:
      print(f"== {result['name']}: {result['images']} images per call; lowered in "
            f"{result['lower_seconds']:.1f} s (not compiled: --lower_only)")
    else:
      print("\n".join(report.format_program(result)))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
