"""TPU chips and topologies to compile for, without a TPU.

`tpu_devices("v5e:2x2")` returns the devices of that topology from libtpu's compiler
(`jax.experimental.topologies`); programs compiled for them are never run here.
"""

import dataclasses
import os
from typing import Any

GIB = 2 ** 30


class TopologyError(ValueError):
  """A topology name libtpu does not know, or a chip this table lacks."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """The figures a step is measured against, per chip."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_second: float
  # Two TensorCores that JAX runs as one device ("megacore"), as on a real v4 / v5p host. libtpu's
  # topology descriptions otherwise give v4 one device per core: half a chip each.
  megacore: bool = False


# HBM capacity and bandwidth per chip and dense bf16 peak, from Google Cloud's TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, megacore=True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, megacore=True),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as 'v5e:2x4' (the part before ':')."""
  name = topology.split(":", 1)[0].strip().lower()
  if name not in CHIPS or ":" not in topology:
    raise TopologyError(f"--topology={topology!r}: expected CHIP:SHAPE with CHIP one of "
                        f"{sorted(CHIPS)}, e.g. 'v5e:2x2' or 'v4:2x2x1'.")
  return CHIPS[name]


def tpu_devices(topology: str) -> tuple[Chip, list[Any]]:
  """(chip, devices) of a TPU topology, from libtpu, on a host that has no TPU: one device per
  chip, as JAX sees them on the real hosts (megacore chips as one device)."""
  chip = chip_of(topology)
  # Without this libtpu asks the GCE metadata server for the host's TPU, and waits for it.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu otherwise takes a machine-wide lock, so a second compiling process (a parallel test
  # worker, another user) would fail; compiling needs no exclusive access to a chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # Local: loads libtpu.
  options = {"chip_config_name": "megacore"} if chip.megacore else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
  except Exception as e:  # libtpu raises XlaRuntimeError/ValueError with its own wording.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"--topology={topology!r}: libtpu does not know it ({first}).") from None
  devices = list(desc.devices)
  chips = {tuple(d.coords) for d in devices}
  if len(chips) != len(devices):  # The figures below are per chip; a device must be one.
    raise TopologyError(f"--topology={topology!r}: libtpu gave {len(devices)} devices on "
                        f"{len(chips)} chips; expected one device per chip.")
  return chip, devices
