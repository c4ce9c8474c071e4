"""The XLA:CPU flag `import ldm_jax` sets: when it applies and when it stays out of the way, and,
in fresh processes, that it reaches XLA (convolutions leave YNNPACK) and nothing else changes."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from ldm_jax import xla_cpu

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAG = f"{xla_cpu.YNN_FUSION_FLAG}={xla_cpu.YNN_FUSION_TYPES}"


def test_flags_to_add_rules():
  assert xla_cpu.flags_to_add("", "0.10.2", {}) == [FLAG]
  assert xla_cpu.flags_to_add("--xla_force_host_platform_device_count=8", "0.10.0", {}) == [FLAG]
  # The opt-out, a choice already in XLA_FLAGS, and jaxlib releases nobody checked: nothing.
  assert xla_cpu.flags_to_add("", "0.10.2", {xla_cpu.OPT_OUT_ENV: "0"}) == []
  assert xla_cpu.flags_to_add(f"{xla_cpu.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                              "0.10.2", {}) == []
  for version in ("0.9.2", "0.11.0", "1.0.0", "dev", None):
    assert xla_cpu.flags_to_add("", version, {}) == [], version


def test_apply_defaults_keeps_existing_flags(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.10.2")
  monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False)
  env = {"XLA_FLAGS": " --xla_force_host_platform_device_count=8 "}
  assert xla_cpu.apply_defaults(env) == [FLAG]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert xla_cpu.apply_defaults(env) == [] and env["XLA_FLAGS"].count(xla_cpu.YNN_FUSION_FLAG) == 1
  # Once a backend runs, XLA no longer reads XLA_FLAGS: leave the environment as it is.
  monkeypatch.setattr(xla_cpu, "_backend_started", lambda: True)
  env = {}
  assert xla_cpu.apply_defaults(env) == [] and env == {}


# Prints the XLA_FLAGS seen after `import ldm_jax` and whether a 64-channel convolution compiled
# into a YNNPACK fusion, then the convolution's value at one position.
_PROBE = """
import sys
import jax
if sys.argv[1] == "backend_first":
  jax.numpy.zeros(1).block_until_ready()
import ldm_jax, os
import jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (2, 16, 16, 64))
w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) / 24
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
compiled = f.lower(x, w).compile()
print(repr(os.environ.get("XLA_FLAGS", "")))
print("__ynn_fusion" in compiled.as_text())
print(float(compiled(x, w)[1, 7, 9, 5]))
"""


def _probe(mode, **extra_env):
  env = {k: v for k, v in os.environ.items() if k != xla_cpu.OPT_OUT_ENV}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="", **extra_env)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, check=True,
                       capture_output=True, text=True).stdout.split("\n")
  return ast.literal_eval(out[0]), out[1] == "True", float(out[2])


@pytest.mark.skipif(xla_cpu.flags_to_add("", xla_cpu._jaxlib_version(), {}) == [],
                    reason="installed jaxlib is not one whose YNNPACK default was checked")
def test_flag_reaches_xla_and_keeps_values():
  flags, ynn, value = _probe("import_first")
  assert flags == FLAG and not ynn
  # The opt-out keeps jaxlib's default, which hands the convolution to YNNPACK: if this fails,
  # XLA's default changed and CHECKED_JAXLIB should not list this release.
  flags_off, ynn_off, value_off = _probe("import_first", **{xla_cpu.OPT_OUT_ENV: "0"})
  assert flags_off == "" and ynn_off
  # Same convolution, other library: equal to float32 rounding (sum of 576 products ~ N(0, 1)).
  assert abs(value - value_off) < 1e-5
  # A backend started before `import ldm_jax`: XLA_FLAGS untouched, jaxlib's default stays.
  flags_late, ynn_late, _ = _probe("backend_first")
  assert flags_late == "" and ynn_late
