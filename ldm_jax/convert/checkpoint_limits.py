"""What every checkpoint reader shares: its errors, its memory budget, bounded messages, file reads.

The readers (`torch_pickle`, `pickle_numpy`, `torch_io`) take untrusted bytes; this module holds
the pieces that keep them honest: `CheckpointError` and its subclasses (the only exceptions they
raise), `LoadBudget` (what one file may materialise), `brief` (describes a value without a full
repr, which a pickle could make gigabytes long), strict int checks, the `guard` that converts
anything else at the entry points, `prescan_pickle` (walks a pickle's opcodes before it is
unpickled), and `NUMERIC_DTYPES`, the dtypes an array may come back with.
"""

import io
import math
import pickletools
from pathlib import Path

import ml_dtypes
import numpy as np

from ldm_jax.errors import CheckpointError, CheckpointNotFoundError


class UnsafeCheckpointError(CheckpointError):
  """The pickle asks to call a global that is not on the allow-list."""


MAX_DIMS = 64  # torch's own limit on tensor rank
# Affine budget: generous for real checkpoints (whose tensors are views of the file's bytes),
# small enough that a tiny file cannot reach gigabytes.
BUDGET_FACTOR, BUDGET_FLOOR = 4, 16 << 20

# ml_dtypes floats an array may have (GLOBAL ml_dtypes.<name> inside numpy pickles).
ML_DTYPES = {name: np.dtype(getattr(ml_dtypes, name)) for name in (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(ml_dtypes, name)}
# Every dtype an array from a checkpoint may have, in native byte order.
NUMERIC_DTYPES = frozenset(
    [np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                           np.uint32, np.uint64, np.float16, np.float32, np.float64, np.complex64,
                           np.complex128)] + list(ML_DTYPES.values()))


def is_numeric(dtype) -> bool:
  """True for the plain numeric dtypes a checkpoint may hold (either byte order)."""
  return isinstance(dtype, np.dtype) and dtype.newbyteorder("=") in NUMERIC_DTYPES


class Frozen:
  """Base of the objects the unpickler hands out. They are shared by every load (or by every call
  in one load), so a pickle's BUILD opcode (which calls __setstate__, else writes attributes and
  slots) must not be able to modify them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"refusing to modify the allow-listed global {self!r}")


class Sentinel(Frozen):
  """A global that may only appear as an argument (numpy.ndarray, builtins.object, ml_dtypes)."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


def brief(obj, limit: int = 60, depth: int = 2) -> str:
  """A short description of `obj` for error messages: never a full repr of attacker data."""
  if isinstance(obj, (str, bytes, bytearray)):
    text = repr(obj[:limit])
    return text + (f"... ({len(obj)} long)" if len(obj) > limit else "")
  if obj is None or isinstance(obj, (bool, float)):
    return repr(obj)
  if isinstance(obj, int):
    return repr(obj) if obj.bit_length() <= 64 else f"<int of {obj.bit_length()} bits>"
  if isinstance(obj, (list, tuple)) and depth > 0:
    inner = ", ".join(brief(x, limit // 2, depth - 1) for x in obj[:4])
    more = ", ..." if len(obj) > 4 else ""
    return f"({inner}{more})" if isinstance(obj, tuple) else f"[{inner}{more}]"
  if isinstance(obj, (list, tuple, dict, set, frozenset)):
    return f"<{type(obj).__name__} of {len(obj)}>"
  if isinstance(obj, (Frozen, np.dtype)):
    return repr(obj)[:limit]
  if isinstance(obj, type):
    return f"<class {obj.__name__[:limit]}>"
  return f"<{type(obj).__name__[:limit]}>"


class LoadBudget:
  """Bytes one load may materialise beyond the file's own: BUDGET_FACTOR x size + BUDGET_FLOOR.

  `what` (the file) starts every message; `pending` counts numpy objects awaiting their checked
  rebuild (`pickle_numpy.finish`).
  """

  def __init__(self, what: str, file_size: int):
    self.what, self.used, self.pending = what, 0, 0
    self.limit = BUDGET_FACTOR * file_size + BUDGET_FLOOR

  def charge(self, nbytes: int, why: str):
    self.used += nbytes
    if self.used > self.limit:
      raise CheckpointError(
          f"{self.what}: {why} would make the file materialise more than {self.limit} bytes "
          f"({BUDGET_FACTOR} x its size + {BUDGET_FLOOR >> 20} MiB); a checkpoint never needs "
          "that, so the file is refused as a memory bomb")


def check_int(value, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
  """`value` if it is an int in [lo, hi), else CheckpointError (bool, float and str are refused)."""
  if type(value) is not int or not lo <= value < hi:
    raise CheckpointError(f"{what} is {brief(value)}; expected an int in [{lo}, {hi})")
  return value


def check_ints(values, what: str) -> tuple[int, ...]:
  """A tuple (or list) of at most MAX_DIMS non-negative ints, as a tuple, else an error."""
  if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
    raise CheckpointError(f"{what} is {brief(values)}; expected a tuple of at most {MAX_DIMS} ints")
  return tuple(check_int(v, what) for v in values)


def check_shape(values, what: str) -> tuple[int, ...]:
  """check_ints, and the product (the element count) small enough for any array."""
  shape = check_ints(values, what)
  if math.prod(shape) >= 1 << 58:  # times an itemsize of at most 16: still below 2^63 bytes
    raise CheckpointError(f"{what} {shape} has more elements than any array can hold")
  return shape


def named(what: str, error: Exception) -> str:
  """The message of `error`, starting with the file name `what`."""
  text = str(error)
  return text if text.startswith(what) else f"{what}: {text}"


class guard:
  """Context manager of the readers' entry points: any exception other than a CheckpointError
  becomes one naming `path`, and a CheckpointError is made to name it too (same class)."""

  def __init__(self, path):
    self.what = str(path)

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if not isinstance(error, Exception):
      return False  # no error, or KeyboardInterrupt and friends: pass through
    if isinstance(error, CheckpointError):
      if str(error).startswith(self.what):
        return False
      raise type(error)(named(self.what, error)) from None
    raise CheckpointError(f"{self.what}: cannot read the checkpoint ({type(error).__name__}: "
                          f"{brief(str(error), 200)})") from None


def check_file(path) -> Path:
  """`path` as a Path, or CheckpointError if it is missing or not a regular file (a directory, a
  FIFO or a device could block or never end)."""
  path = Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
  if path.is_dir():
    raise CheckpointError(f"{path}: is a directory; for a diffusers folder use "
                          "read_diffusers_folder(), otherwise pass a checkpoint file")
  if not path.is_file():
    raise CheckpointError(f"{path}: is not a regular file")
  return path


def read_file(path: Path, limit: int | None = None) -> bytes:
  """The whole file, read once (its size taken first, so a growing file cannot make it longer)."""
  size = path.stat().st_size
  if limit is not None and size > limit:
    raise CheckpointError(f"{path}: {size} bytes, more than the {limit} such a file may have")
  with open(path, "rb") as f:
    data = f.read(size)
  if len(data) != size:
    raise CheckpointError(f"{path}: changed size while being read")
  return data


# Bytes of Python objects each opcode builds beyond the 8-byte reference every opcode may leave
# on the stack or in a container (measured with tracemalloc on CPython 3.11, 64-bit; strings count
# their header only, their text being at most 4x the bytes that spell it). Charged by prescan_pickle
# before anything is built: an EMPTY_SET is one byte of pickle and 224 bytes of memory.
_OPCODE_COST = {
    "EMPTY_SET": 216, "FROZENSET": 216, "EMPTY_DICT": 64, "DICT": 64, "EMPTY_LIST": 56,
    "LIST": 56, "TUPLE": 64, "TUPLE1": 48, "TUPLE2": 56, "TUPLE3": 64, "NEWOBJ": 200,
    "NEWOBJ_EX": 200, "OBJ": 200, "INST": 200, "REDUCE": 128, "BINPERSID": 64, "PERSID": 64,
    "BININT": 32, "BININT2": 32, "LONG1": 32, "LONG4": 32, "INT": 32, "LONG": 32, "BINFLOAT": 24,
    "FLOAT": 24, "BINUNICODE": 48, "SHORT_BINUNICODE": 48, "BINUNICODE8": 48, "UNICODE": 48,
    "BINSTRING": 48, "SHORT_BINSTRING": 48, "STRING": 48, "BINBYTES": 40, "SHORT_BINBYTES": 40,
    "BINBYTES8": 40, "BYTEARRAY8": 64, "SETITEM": 32, "SETITEMS": 32, "ADDITEMS": 32,
}


def prescan_pickle(file: io.BytesIO, budget: "LoadBudget"):
  """Walks the opcodes of the pickle at the file's position, building nothing, then rewinds.

  CPython's C unpickler trusts two numbers a pickle gives it: a memo index (LONG_BINPUT 2^32
  makes it allocate and zero a 32 GiB memo table) and the length of a counted string (allocated
  before it is read). pickletools reads every counted argument, so a length past the bytes that
  are there fails here; each memo index is checked against the pickle's size, and the objects the
  opcodes will build are charged to the budget.
  """
  start, top, cost = file.tell(), -1, 0
  for op, arg, _ in pickletools.genops(file):
    cost += 8 + _OPCODE_COST.get(op.name, 0)
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
      top = max(top, arg)
  size = file.tell() - start
  if top > size:
    raise CheckpointError(f"memo index {top} in a pickle of {size} bytes: the unpickler would "
                          "allocate a memo table that large")
  budget.charge(cost, f"a pickle of {size} bytes building ~{cost} bytes of objects")
  file.seek(start)
