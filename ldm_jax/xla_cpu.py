"""XLA:CPU flags that ldm_jax sets before JAX starts its CPU backend (`import ldm_jax` does it).

jaxlib 0.10's XLA:CPU hands dots, convolutions and reductions to YNNPACK. Its convolutions run the
64-channel 3x3 convolutions of a UNet's first level on one thread (measured on 2 cores: CPU time /
wall time ~1.0 at [8, 32, 32, 64]), where XLA's own Eigen convolutions use every core and are
faster summed over the UNet's convolutions with their gradients. So ldm_jax keeps YNNPACK for dots
and reductions and gives convolutions back to Eigen (see benchmarks/README.md, 2026-12-02, "XLA:CPU
convolutions").

The flag only changes which kernel library XLA:CPU calls; accelerator backends ignore it. It is set
only when all of these hold, so it never overrides a choice or aborts a process:
  * `LDM_JAX_XLA_CPU_DEFAULTS` is not `0` (the opt-out);
  * XLA_FLAGS does not already set `--xla_cpu_experimental_ynn_fusion_type` (the user's choice wins);
  * the installed jaxlib is a release where the flag and its default were checked (XLA aborts the
    process on a flag it does not know, and a later default may differ);
  * no JAX backend is running yet (XLA reads XLA_FLAGS once, when the first backend starts).
"""

import importlib.metadata
import logging
import os
import sys

OPT_OUT_ENV = "LDM_JAX_XLA_CPU_DEFAULTS"
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib's default minus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# (major, minor) releases of jaxlib whose default was read from compiled HLO and timed.
CHECKED_JAXLIB = ((0, 10),)


def _major_minor(version):
  parts = version.split(".")
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    return None


def flags_to_add(xla_flags, jaxlib_version, environ):
  """The XLA flags ldm_jax would append to `xla_flags` (a list, empty when none apply)."""
  if environ.get(OPT_OUT_ENV, "1").strip() == "0":
    return []
  if YNN_FUSION_FLAG in xla_flags:
    return []
  if jaxlib_version is None or _major_minor(jaxlib_version) not in CHECKED_JAXLIB:
    return []
  return [f"{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}"]


def _jaxlib_version():
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def _backend_started():
  # Only a JAX that is already imported can have started a backend; importing it here would cost
  # `import ldm_jax.data` (Grain workers) a second.
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  return xla_bridge is not None and xla_bridge.backends_are_initialized()


def apply_defaults(environ=os.environ):
  """Appends `flags_to_add` to environ['XLA_FLAGS']; returns the flags added."""
  current = environ.get("XLA_FLAGS", "")
  added = flags_to_add(current, _jaxlib_version(), environ)
  if not added:
    return []
  if _backend_started():
    logging.info("ldm_jax: a JAX backend is already running, so XLA_FLAGS %s is not applied; "
                 "import ldm_jax before the first JAX computation to get it.", added)
    return []
  environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added
