"""Safe unpickling of torch checkpoints into numpy: the allow-list, the zip and legacy readers.

A torch checkpoint is a pickle, and unpickling runs whatever callables the file names. We unpickle
with an allow-list: `find_class` resolves only the handful of globals that tensors and plain
containers need, each mapped to our own numpy re-implementation, never to torch. Any other global
becomes an inert placeholder class: it can sit in the data (Lightning checkpoints use
`pytorch_lightning...ModelCheckpoint` as a dict key in `callbacks`), `NEWOBJ`/`BUILD` on it only
record arguments and state, but *calling* it (the `REDUCE` opcode, which is how `os.system` or
`builtins.eval` would run) raises `UnsafeCheckpointError` naming the global.

Formats: torch's zip format (`<archive>/data.pkl` + `<archive>/data/<key>` storages + `byteorder`)
and torch's legacy single-pickle format (magic number, pickles, then the storages appended).
Tensors come back as numpy arrays with their exact dtype, shape and values (storage offset and
strides honoured; bf16 / fp8 as `ml_dtypes`). The public entry points live in
`ldm_jax.convert.torch_io`.

What a hostile file can and cannot do (the promises hold for `torch_io.load_safetensors` and
`load_state_dict` too; `tests/convert/test_torch_io_hostile.py` tests each, and fuzzes them all):
  * Arrays are plain numbers. Every array returned has a dtype in `NUMERIC_DTYPES` (bool, int,
    uint, float, complex, bf16 / fp8), in native byte order: no object, structured, sub-array or
    string dtype. numpy's `__setstate__` never runs on data from the file: `numpy.dtype` and
    `_reconstruct` + BUILD only record what the pickle declares, and once it is read each array is
    rebuilt by us from a checked (dtype, shape, bytes) triple (`pickle_numpy`). No numpy dtype
    object is reachable while unpickling, so BUILD on a tensor cannot reach numpy's setstate.
  * Geometry is checked before numpy sees it: sizes and strides are non-negative ints (at most 64
    dims), the element count fits an array, the storage offset and the last element lie inside the
    storage.
  * Tensors are read-only views: of their storage (contiguous or strided, expanded, transposed),
    or of the safetensors file's bytes; only big-endian data is copied (byte-swapped). Nothing is
    copied by the readers; `convert.common.strict_load` copies a tensor once its key and shape
    matched the model.
  * Memory is bounded by the file size (`checkpoint_limits.LoadBudget`). Tensor bytes are the
    file's own, read once: zip members must be stored uncompressed, with sizes that agree and add
    up to no more than the file; safetensors ranges may not overlap. Everything else a file can
    make the reader build is charged to a budget of 4 x the file size + 16 MiB, before it is
    built: the logical size of strided views (a stride-0 tensor of 2^30 floats over one float), the
    objects the pickle's opcodes create (an EMPTY_SET is 1 byte and 224 bytes of memory; costs per
    opcode in `_OPCODE_COST`), copies made by allow-listed constructors (`set`, `bytearray`,
    `_codecs.encode`, ... of a memoised string), placeholder classes, byte-swapped copies.
    Before the C unpickler runs, `prescan_pickle` walks the opcodes: a counted length past the data, or
    a memo index past the pickle's size (which would make CPython allocate a table that large), is
    an error.
  * Errors: every failure is a `CheckpointError` (or subclass) whose message starts with the file
    path. Anything else raised on malformed input (TypeError, RecursionError, OverflowError,
    MemoryError, zipfile.BadZipFile, pickle.UnpicklingError, ...) is converted at the entry points
    (`checkpoint_limits.guard`). Messages describe offending values with `brief`, never a full
    repr, which a pickle could make gigabytes long. Only regular files are opened (a FIFO would
    block).
"""

import _compat_pickle
import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ldm_jax.convert import pickle_numpy
from ldm_jax.convert.checkpoint_limits import (NUMERIC_DTYPES, CheckpointError,
                                               CheckpointNotFoundError, Frozen, LoadBudget,
                                               Sentinel, UnsafeCheckpointError, brief, check_file,
                                               check_int, check_ints, check_shape, guard,
                                               is_numeric, named, prescan_pickle,
                                               read_file)

__all__ = ["CheckpointError", "CheckpointNotFoundError", "UnsafeCheckpointError", "OpaqueGlobal",
           "NUMERIC_DTYPES", "is_numeric", "check_file", "guard", "load_torch_checkpoint",
           "to_native"]

# Charged per unknown global (each becomes a class object) and per element a constructor copies.
_CLASS_COST, _ITEM_COST = 4096, 64


# ---------------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------------

# torch dtype name (as pickled: GLOBAL torch.<name>) -> numpy dtype.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
# Legacy typed storage classes (GLOBAL torch.<Name>Storage) -> numpy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


def to_native(buf: np.ndarray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  """Raw bytes [n * itemsize] -> 1-D array of `dtype`, byte-swapping big-endian data (a copy)."""
  dtype = np.dtype(dtype)
  if len(buf) % dtype.itemsize:
    raise CheckpointError(f"storage of {len(buf)} bytes is not a whole number of {dtype} items")
  if big_endian and dtype.itemsize > 1:
    # Complex numbers swap each component; ml_dtypes types swap via their unsigned twin.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    buf = buf.view(f"<u{unit}").byteswap().view(np.uint8)
    buf.flags.writeable = False
  return buf.view(dtype)


# ---------------------------------------------------------------------------------------------------
# Inert placeholders for globals that are not on the allow-list
# ---------------------------------------------------------------------------------------------------

class _OpaqueMeta(type):
  """Metaclass whose __call__ refuses: the REDUCE opcode calls the global it names."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"refusing to call '{cls.global_name:.200}': the checkpoint asks to run a function or "
        "class that is not on the allow-list of tensor/container globals (possibly malicious)")

  def __repr__(cls):
    return f"<opaque global {cls.global_name:.200}>"


class OpaqueGlobal(metaclass=_OpaqueMeta):
  """A global referenced by a checkpoint but never imported. Instances made by NEWOBJ/BUILD only
  record `opaque_args` and `opaque_state`; no code of the real class runs."""
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.opaque_args, obj.opaque_state = args, None
    return obj

  def __setstate__(self, state):
    self.opaque_state = state

  def __repr__(self):
    return f"<opaque {type(self).global_name:.200} instance>"


def _opaque(name: str) -> type:
  """A fresh placeholder class (the unpickler memoises one per global name and per load, so a
  file cannot leave state behind in classes other loads would see)."""
  return _OpaqueMeta(name.rsplit(".", 1)[-1], (OpaqueGlobal,), {"global_name": name})


# ---------------------------------------------------------------------------------------------------
# Safe re-implementations of the allowed globals
# ---------------------------------------------------------------------------------------------------

class _Callable(Frozen):
  """An allow-listed global implemented by `fn(budget, *args)`; find_class hands out a copy bound
  to the budget of the current load."""
  __slots__ = ("name", "fn", "budget")

  def __init__(self, name: str, fn, budget: LoadBudget | None = None):
    self.name, self.fn, self.budget = name, fn, budget

  def __call__(self, *args, **kwargs):
    return self.fn(self.budget, *args, **kwargs)

  def __repr__(self):
    return self.name


class _StorageType(Frozen):
  """Stands for torch.<X>Storage / torch.storage.UntypedStorage in persistent ids."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """A loaded storage: its raw bytes (read-only), viewed with a dtype on demand (each view made
  once per dtype; big-endian data is byte-swapped then, a copy charged to the budget)."""

  def __init__(self, raw: np.ndarray, big_endian: bool):
    raw.flags.writeable = False
    self.raw, self.big_endian = raw, big_endian
    self._views: dict[np.dtype, np.ndarray] = {}

  def view(self, dtype, budget: LoadBudget) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype not in self._views:
      if self.big_endian and dtype.itemsize > 1:
        budget.charge(self.raw.size, "byte-swapping a big-endian storage")
      self._views[dtype] = to_native(self.raw, dtype, self.big_endian)
    return self._views[dtype]


class _TypedStorage(Frozen):
  """What a persistent id resolves to: a storage and the dtype its storage class names."""
  __slots__ = ("storage", "dtype")

  def __init__(self, storage: _Storage, dtype: np.dtype):
    self.storage, self.dtype = storage, dtype


def _rebuild(budget, storage, offset, size, stride, dtype=None) -> np.ndarray:
  """(storage, storage_offset, size, stride) -> read-only numpy view, bounds-checked (as_strided is
  not). Views that are not contiguous are charged to the budget by their logical size: a copy of
  them (by a caller) would materialise that much."""
  if storage is None:  # first pass of the legacy reader: storages are not read yet
    return None
  if not isinstance(storage, _TypedStorage):
    raise CheckpointError(f"tensor data is {brief(storage)}, expected a storage")
  size, stride = check_shape(size, "tensor size"), check_ints(stride, "tensor stride")
  offset = check_int(offset, "tensor storage offset")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
  flat = storage.storage.view(storage.dtype if dtype is None else dtype, budget)  # [numel]
  itemsize, numel = flat.dtype.itemsize, math.prod(size)
  if numel == 0:
    empty = np.zeros(size, flat.dtype)
    empty.flags.writeable = False
    return empty
  # A dimension of size 1 is never stepped over, so its stride (which torch leaves arbitrary) is
  # irrelevant: zeroing it keeps the byte strides handed to numpy small.
  stride = tuple(0 if n == 1 else s for n, s in zip(size, stride))
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(f"tensor (size {size}, stride {stride}, offset {offset}) reads past its "
                          f"storage of {flat.size} items: the file is corrupt")
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * itemsize for s in stride),
                                         writeable=False)
  if not view.flags.c_contiguous:
    budget.charge(numel * itemsize, f"a strided view of size {size}, stride {stride}")
  return view


def _rebuild_tensor(budget, storage, offset, size, stride):
  return _rebuild(budget, storage, offset, size, stride)


def _rebuild_tensor_v2(budget, storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  return _rebuild(budget, storage, offset, size, stride)


def _rebuild_tensor_v3(budget, storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
    raise CheckpointError(f"tensor dtype {brief(dtype)} is not supported; expected one of "
                          f"{sorted(_DTYPE_NAMES)}")
  return _rebuild(budget, storage, offset, size, stride, _DTYPE_NAMES[dtype])


def _rebuild_parameter(budget, data, requires_grad=False, hooks=None, state=None):
  return data


def _rebuild_from_type_v2(budget, func, new_type, args, state):
  # `func` is itself an object the pickle resolved through find_class, so it is either one of ours
  # or an opaque placeholder that raises when called.
  if not isinstance(args, tuple):
    raise CheckpointError(f"_rebuild_from_type_v2 arguments are {brief(args)}, expected a tuple")
  return func(*args)


def _codecs_encode(budget, text, encoding="latin1"):
  # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); nothing else is needed.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"refusing _codecs.encode({brief(text)}, {brief(encoding)})")
  budget.charge(len(text), "_codecs.encode")
  return text.encode("latin1")


def _copying(make, name):
  """An allow-listed constructor that copies its (sized) arguments: charged per element."""
  def fn(budget, *args):
    for a in args:
      if not isinstance(a, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
        raise UnsafeCheckpointError(f"refusing {name}({brief(a)}): expected plain data")
      budget.charge(_ITEM_COST * len(a), name)
    return make(*args)
  return fn


def _defaultdict(budget, factory=None, *args):
  # The factory (e.g. an opaque `builtins.list`) is never called: a plain dict holds the same data.
  return _copying(dict, "defaultdict")(budget, *args)


def _bytearray(budget, data=b"", encoding=None):
  # bytearray(n) would allocate n zero bytes from a 5-byte int: only copies of data are allowed.
  if isinstance(data, str) and encoding in ("latin1", "latin-1"):
    data = data.encode("latin1")
  if not isinstance(data, bytes):
    raise UnsafeCheckpointError(f"refusing bytearray({brief(data)}, {brief(encoding)})")
  budget.charge(len(data), "bytearray")
  return bytearray(data)


def _bytes(budget, *args):
  # Protocol 2 pickles b"" as bytes(); any argument could ask for a size or a copy.
  if args:
    raise UnsafeCheckpointError(f"refusing bytes({brief(args)}): only bytes() is needed")
  return b""


def _size(budget, dims=()):
  return check_shape(dims, "torch.Size")


def _device(budget, kind, index=None):
  if not isinstance(kind, str) or len(kind) > 64 or not (index is None or type(index) is int):
    raise CheckpointError(f"torch.device({brief(kind)}, {brief(index)}) is not a device")
  return kind if index is None else f"{kind}:{index}"


def _layout(budget, name):
  if not isinstance(name, str) or len(name) > 64:
    raise CheckpointError(f"torch layout {brief(name)} is not a layout name")
  return name


def _copyreg_reconstructor(budget, cls, base, state):
  if isinstance(cls, _OpaqueMeta) and base is _OBJECT and state is None:
    return OpaqueGlobal.__new__(cls)
  raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({brief(cls)}, {brief(base)})")


_OBJECT = Sentinel("builtins.object")  # allowed only as the base argument of _reconstructor

# Immutable values handed out as they are; everything callable is a _Callable of ours.
_ALLOWED: dict[str, Any] = {
    "torch.Tensor": "torch.Tensor", "torch.nn.parameter.Parameter": "torch.nn.Parameter",
    "builtins.complex": complex, "builtins.slice": slice,  # fixed-size results from numbers
    "builtins.object": _OBJECT, "numpy.ndarray": pickle_numpy.NDARRAY,
}
_ALLOWED.update(pickle_numpy.ML_DTYPE_GLOBALS)
_ALLOWED.update({name: _Callable(name, fn) for name, fn in {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _size, "torch.device": _device, "torch.serialization._get_layout": _layout,
    "collections.OrderedDict": _copying(collections.OrderedDict, "OrderedDict"),
    "collections.Counter": _copying(lambda *a: dict(collections.Counter(*a)), "Counter"),
    "collections.defaultdict": _defaultdict,
    "builtins.set": _copying(set, "set"), "builtins.frozenset": _copying(frozenset, "frozenset"),
    "builtins.bytearray": _bytearray, "builtins.bytes": _bytes,
    "_codecs.encode": _codecs_encode, "copyreg._reconstructor": _copyreg_reconstructor,
    "numpy.dtype": pickle_numpy.np_dtype,
    "numpy.core.multiarray.scalar": pickle_numpy.np_scalar,
    "numpy._core.multiarray.scalar": pickle_numpy.np_scalar,
    "numpy.core.multiarray._reconstruct": pickle_numpy.np_reconstruct,
    "numpy._core.multiarray._reconstruct": pickle_numpy.np_reconstruct,
}.items()})
_ALLOWED.update({f"torch.{k}": _StorageType(k, v) for k, v in _STORAGE_DTYPES.items()})
_ALLOWED["torch.storage.UntypedStorage"] = _ALLOWED["torch.UntypedStorage"]
# torch dtypes load as their names ("torch.float16"): immutable, and plain data for callers.
_DTYPE_NAMES = {f"torch.{k}": np.dtype(v) for k, v in _TORCH_DTYPES.items()}
_ALLOWED.update({name: name for name in _DTYPE_NAMES})


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler resolving only allow-listed globals; storages come from `storages[key]`."""

  def __init__(self, file, storages: Mapping[str, _Storage] | None, budget: LoadBudget,
               seen: dict | None = None):
    super().__init__(file)
    self.storages, self.budget, self.what = storages, budget, budget.what
    self.seen = {} if seen is None else seen  # storage key -> dtype, for the legacy reader
    self.resolved: dict[str, Any] = {}  # per load: bound callables and placeholder classes

  def find_class(self, module, name):
    # Protocol-2 pickles carry Python 2 names (__builtin__.eval, commands.Popen); the stock
    # find_class maps them back, which an override must do itself.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    full = f"{module}.{name}"
    if full not in self.resolved:
      found = _ALLOWED.get(full)
      if isinstance(found, _Callable):
        found = _Callable(found.name, found.fn, self.budget)
      elif found is None and full not in _ALLOWED:
        self.budget.charge(_CLASS_COST, f"unknown global {brief(full)}")
        found = _opaque(full)
      self.resolved[full] = found
    return self.resolved[full]

  def persistent_load(self, pid):
    if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
      raise CheckpointError(f"{self.what}: unsupported persistent id {brief(pid)} (only tensor "
                            "storages are supported, not pickled modules)")
    if len(pid) > 5 and pid[5] is not None:  # legacy storage views: torch stopped writing them
      raise CheckpointError(f"{self.what}: storage views (legacy view_metadata) are not supported")
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self.what}: unknown storage type {brief(storage_type)}")
    if not isinstance(key, str) or len(key) > 256:
      raise CheckpointError(f"{self.what}: storage key {brief(key)} is not a short string")
    self.seen[key] = storage_type.dtype
    if self.storages is None:  # legacy first pass
      return None
    if key not in self.storages:
      raise CheckpointError(f"{self.what}: storage '{key}' is referenced but not in the file")
    return _TypedStorage(self.storages[key], storage_type.dtype)


# ---------------------------------------------------------------------------------------------------
# torch checkpoints
# ---------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _unpickle(data: bytes | io.BytesIO, storages, budget: LoadBudget, seen=None):
  """One pickle from `data` (in memory, checked by prescan_pickle first), numpy objects rebuilt and
  checked."""
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    prescan_pickle(file, budget)
    obj = _SafeUnpickler(file, storages, budget, seen).load()
    return pickle_numpy.finish(obj, budget) if budget.pending else obj
  except CheckpointError as e:
    raise type(e)(named(budget.what, e)) from None
  except Exception as e:  # malformed pickles raise anything from EOFError to TypeError
    raise CheckpointError(f"{budget.what}: cannot unpickle ({type(e).__name__}: "
                          f"{brief(str(e), 200)})") from None


def _stored_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, path: Path):
  """Refuses a zip member torch would not have written: compressed (a deflated member can expand
  ~1000x), encrypted, or whose sizes disagree or run past the file."""
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
    raise CheckpointError(f"{path}: zip member {brief(info.filename)} is compressed or encrypted; "
                          "torch stores checkpoint members uncompressed")
  if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
    raise CheckpointError(f"{path}: zip member {brief(info.filename)} declares {info.file_size} "
                          f"bytes ({info.compress_size} stored) in a file of {size}: corrupt")


def _load_zip(path: Path) -> Any:
  size = path.stat().st_size
  budget = LoadBudget(str(path), size)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e}); re-download or "
                          "re-save the checkpoint") from None
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
      raise CheckpointError(f"{path}: is a TorchScript archive, not a checkpoint")
    if len(pkls) != 1:
      raise CheckpointError(f"{path}: zip archive without a single '<archive>/data.pkl' "
                            f"(found {brief(pkls)}); not a torch checkpoint")
    prefix = pkls[0][:-len("data.pkl")]
    infos = {i.filename[len(prefix) + 5:]: i for i in zf.infolist()
             if i.filename.startswith(prefix + "data/")}
    used = [zf.getinfo(pkls[0])] + list(infos.values())
    if prefix + "byteorder" in names:
      used.append(zf.getinfo(prefix + "byteorder"))
    for info in used:
      _stored_member(zf, info, size, path)
    # Stored members are byte ranges of the file; more of them than the file holds means several
    # directory entries point at the same bytes, which would be read (and kept) once each.
    total = sum(i.file_size for i in used)
    if total > size:
      raise CheckpointError(f"{path}: zip members add up to {total} bytes, more than the file's "
                            f"{size}: entries overlap")
    try:
      big = prefix + "byteorder" in names and zf.read(prefix + "byteorder") == b"big"
      storages = _ZipStorages(zf, infos, big, path)
      return _unpickle(zf.read(pkls[0]), storages, budget)
    except (zipfile.BadZipFile, EOFError) as e:
      raise CheckpointError(f"{path}: corrupt zip member ({e}); re-download the "
                            "checkpoint") from None


class _ZipStorages(dict):
  """Reads `data/<key>` members lazily, the first time a persistent id names them."""

  def __init__(self, zf, infos, big_endian, path):
    super().__init__()
    self.zf, self.infos, self.big, self.path = zf, infos, big_endian, path

  def __contains__(self, key):
    return key in self.infos

  def __getitem__(self, key):
    if not dict.__contains__(self, key):
      info = self.infos[key]
      raw = np.empty(info.file_size, np.uint8)
      with self.zf.open(info) as f:
        got = f.readinto(memoryview(raw))
      if got != info.file_size:
        raise CheckpointError(f"{self.path}: storage {key} is truncated")
      dict.__setitem__(self, key, _Storage(raw, self.big))
    return dict.__getitem__(self, key)


def _load_legacy(path: Path) -> Any:
  what = str(path)
  data = read_file(path)  # storages are views of these bytes: nothing is copied
  f = io.BytesIO(data)
  budget = LoadBudget(what, len(data))
  if _unpickle(f, None, budget) != _LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
  _unpickle(f, None, budget)  # protocol version
  sys_info = _unpickle(f, None, budget)
  big = isinstance(sys_info, dict) and sys_info.get("little_endian", True) is False
  start = f.tell()
  # Pass 1: walk the main pickle only to learn each storage's dtype and reach the data section.
  dtypes: dict[str, np.dtype] = {}
  _unpickle(f, None, budget, seen=dtypes)
  keys = _unpickle(f, None, budget)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"{path}: legacy storage list is {brief(keys)}; expected a list of "
                          "storage keys (strings)")
  storages, pos = {}, f.tell()
  for key in keys:
    if len(data) - pos < 8:
      raise CheckpointError(f"{path}: truncated legacy checkpoint (storage {brief(key)})")
    numel = struct.unpack_from("<q", data, pos)[0]
    nbytes = numel * np.dtype(dtypes.get(key, np.uint8)).itemsize
    pos += 8
    if not 0 <= nbytes <= len(data) - pos:
      raise CheckpointError(f"{path}: storage {brief(key)} declares {numel} items, more than the "
                            f"{len(data) - pos} bytes left: truncated legacy checkpoint")
    storages[key] = _Storage(np.frombuffer(data, np.uint8, nbytes, pos), big)
    pos += nbytes
  f.seek(start)
  # Pass 2, with the data; pass 1's objects are gone, so its charges are forgotten.
  return _unpickle(f, storages, LoadBudget(what, len(data)))


def load_torch_checkpoint(path) -> Any:
  """Loads a `torch.save` file (zip or legacy format) with tensors as read-only numpy arrays.

  Only tensor rebuilders, storages, dtypes, `OrderedDict`, `torch.Size` and plain builtins are
  resolved; other globals load as `OpaqueGlobal` placeholders and calling one raises
  `UnsafeCheckpointError`. Raises CheckpointError naming `path` for anything malformed (see the
  module docstring for what is accepted and capped).
  """
  path = check_file(path)
  with guard(path):
    with open(path, "rb") as f:
      head = f.read(4)
    if head == _ZIP_MAGIC:
      return _load_zip(path)
    if head[:1] == b"\x80":  # a pickle protocol marker: the legacy format
      return _load_legacy(path)
    if head[:2] == b"\x1f\x8b" or head.startswith(b"stor"):
      raise CheckpointError(f"{path}: compressed or pre-0.4 tar checkpoints are not supported")
    raise CheckpointError(f"{path}: not a torch checkpoint (starts with {head!r})")
