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
Tensors come back as numpy arrays with their exact dtype, shape and values (storage offset and strides
honoured; bf16 / fp8 as `ml_dtypes`); contiguous tensors share memory with their storage like torch's
do, non-contiguous ones are copied. The public entry points live in `ldm_jax.convert.torch_io`.
"""

import _compat_pickle
import collections
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file is missing, malformed or of an unsupported kind."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle asks to call a global that is not on the allow-list."""


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
  """Raw bytes [n * itemsize] -> 1-D array of `dtype`, byte-swapping big-endian data."""
  dtype = np.dtype(dtype)
  if len(buf) % dtype.itemsize:
    raise CheckpointError(f"storage of {len(buf)} bytes is not a whole number of {dtype} items")
  if big_endian and dtype.itemsize > 1:
    # Complex numbers swap each component; ml_dtypes types swap via their unsigned twin.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    buf = buf.view(f"<u{unit}").byteswap().view(np.uint8)
  return buf.view(dtype)


# ---------------------------------------------------------------------------------------------------
# Inert placeholders for globals that are not on the allow-list
# ---------------------------------------------------------------------------------------------------

class _OpaqueMeta(type):
  """Metaclass whose __call__ refuses: the REDUCE opcode calls the global it names."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"refusing to call '{cls.global_name}': the checkpoint asks to run a function or class "
        f"that is not on the allow-list of tensor/container globals (possibly malicious)")

  def __repr__(cls):
    return f"<opaque global {cls.global_name}>"


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
    return f"<opaque {type(self).global_name} instance>"


def _opaque(name: str) -> type:
  """A fresh placeholder class (the unpickler memoises one per global name and per load, so a
  file cannot leave state behind in classes other loads would see)."""
  return _OpaqueMeta(name.rsplit(".", 1)[-1], (OpaqueGlobal,), {"global_name": name})


# ---------------------------------------------------------------------------------------------------
# Safe re-implementations of the allowed globals
# ---------------------------------------------------------------------------------------------------

class _Frozen:
  """Base of the objects find_class hands out. They are shared by every load, so a pickle's BUILD
  opcode (which calls __setstate__, else writes attributes) must not be able to modify them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"refusing to modify the allow-listed global {self!r}")


class _Callable(_Frozen):
  """An allow-listed global implemented by `fn`."""
  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn):
    self.name, self.fn = name, fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    return self.name


class _Sentinel(_Frozen):
  """A global that may only appear as an argument (numpy.ndarray, builtins.object)."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


class _StorageType(_Frozen):
  """Stands for torch.<X>Storage / torch.storage.UntypedStorage in persistent ids."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage:
  """A loaded storage: its raw bytes, viewed with a dtype on demand (each view made once)."""

  def __init__(self, raw: np.ndarray, big_endian: bool):
    self.raw, self.big_endian = raw, big_endian
    self._views: dict[np.dtype, np.ndarray] = {}

  def view(self, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype not in self._views:
      self._views[dtype] = to_native(self.raw, dtype, self.big_endian)
    return self._views[dtype]


class _TypedStorage(_Frozen):
  """What a persistent id resolves to: a storage and the dtype its storage class names."""
  __slots__ = ("storage", "dtype")

  def __init__(self, storage: _Storage, dtype: np.dtype):
    self.storage, self.dtype = storage, dtype


def _rebuild(storage, offset, size, stride, dtype=None) -> np.ndarray:
  """(storage, storage_offset, size, stride) -> numpy array, bounds-checked (as_strided is not)."""
  if storage is None:  # first pass of the legacy reader: storages are not read yet
    return None
  if not isinstance(storage, _TypedStorage):
    raise CheckpointError(f"tensor data is a {type(storage).__name__}, expected a storage")
  flat = storage.storage.view(storage.dtype if dtype is None else dtype)  # [numel]
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise CheckpointError(f"bad tensor geometry: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(f"tensor (size {size}, stride {stride}, offset {offset}) reads past its "
                          f"storage of {flat.size} items: the file is corrupt")
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * itemsize for s in stride))
  # Contiguous tensors stay views of the shared storage (as in torch); others become copies so that
  # no aliasing (e.g. zero strides from expand()) leaks into caller code.
  return view if view.flags.c_contiguous else np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride):
  return _rebuild(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  return _rebuild(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  if dtype not in _DTYPE_NAMES:
    raise CheckpointError(f"tensor dtype {dtype!r} is not supported; expected one of "
                          f"{sorted(_DTYPE_NAMES)}")
  return _rebuild(storage, offset, size, stride, _DTYPE_NAMES[dtype])


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # `func` is itself an object the pickle resolved through find_class, so it is either one of ours
  # or an opaque placeholder that raises when called.
  return func(*args)


def _codecs_encode(text, encoding="latin1"):
  # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); nothing else is needed.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
  return text.encode("latin1")


def _defaultdict(factory=None, *args):
  return dict(*args)  # the factory is never called: a plain dict holds the same data


def _np_dtype(name, align=False, copy=False):
  if not isinstance(name, str):
    raise UnsafeCheckpointError(f"refusing numpy.dtype({type(name).__name__})")
  # Always a copy: the BUILD that follows would otherwise rewrite numpy's shared builtin dtype.
  return np.dtype(name, bool(align), True)


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafeCheckpointError("refusing numpy scalar of object dtype")
  return np.frombuffer(data, dtype)[0]


_NDARRAY = _Sentinel("numpy.ndarray")  # allowed only as the class argument of _reconstruct
_OBJECT = _Sentinel("builtins.object")  # allowed only as the base argument of _reconstructor


def _np_reconstruct(cls, shape, typecode):
  if cls is not _NDARRAY:
    raise UnsafeCheckpointError("numpy _reconstruct of a class other than numpy.ndarray")
  return np.ndarray.__new__(np.ndarray, (0,), np.uint8)  # filled in by BUILD (__setstate__)


def _copyreg_reconstructor(cls, base, state):
  if isinstance(cls, _OpaqueMeta) and base is _OBJECT and state is None:
    return OpaqueGlobal.__new__(cls)
  raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({cls!r}, {base!r})")


def _counter(*args):
  return dict(collections.Counter(*args))


# Immutable builtins and types handed out as they are; our functions wrapped as _Callable.
_ALLOWED: dict[str, Any] = {
    "torch.Size": tuple, "torch.device": str, "torch.serialization._get_layout": str,
    "torch.Tensor": "torch.Tensor", "torch.nn.parameter.Parameter": "torch.nn.Parameter",
    "collections.OrderedDict": collections.OrderedDict,  # the C type: its attributes are fixed
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
    "builtins.complex": complex, "builtins.slice": slice, "builtins.object": _OBJECT,
    "numpy.ndarray": _NDARRAY,
}
_ALLOWED.update({name: _Callable(name, fn) for name, fn in {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.Counter": _counter, "collections.defaultdict": _defaultdict,
    "_codecs.encode": _codecs_encode, "copyreg._reconstructor": _copyreg_reconstructor,
    "numpy.dtype": _np_dtype,
    "numpy.core.multiarray.scalar": _np_scalar, "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
}.items()})
_ALLOWED.update({f"torch.{k}": _StorageType(k, v) for k, v in _STORAGE_DTYPES.items()})
_ALLOWED["torch.storage.UntypedStorage"] = _ALLOWED["torch.UntypedStorage"]
# torch dtypes load as their names ("torch.float16"): immutable, and plain data for callers.
_DTYPE_NAMES = {f"torch.{k}": np.dtype(v) for k, v in _TORCH_DTYPES.items()}
_ALLOWED.update({name: name for name in _DTYPE_NAMES})


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler resolving only allow-listed globals; storages come from `storages[key]`."""

  def __init__(self, file, storages: Mapping[str, _Storage] | None, what: str):
    super().__init__(file)
    self.storages, self.what = storages, what
    self.seen: dict[str, np.dtype] = {}  # storage key -> dtype, for the legacy reader
    self.opaque: dict[str, type] = {}  # one placeholder class per unknown global name

  def find_class(self, module, name):
    # Protocol-2 pickles carry Python 2 names (__builtin__.eval, commands.Popen); the stock
    # find_class maps them back, which an override must do itself.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    full = f"{module}.{name}"
    if full in _ALLOWED:
      return _ALLOWED[full]
    if full not in self.opaque:
      self.opaque[full] = _opaque(full)
    return self.opaque[full]

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise CheckpointError(f"{self.what}: unsupported persistent id {pid!r:.80} (only tensor "
                            "storages are supported, not pickled modules)")
    if len(pid) > 5 and pid[5] is not None:  # legacy storage views: torch stopped writing them
      raise CheckpointError(f"{self.what}: storage views (legacy view_metadata) are not supported")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self.what}: unknown storage type {storage_type!r}")
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


def check_file(path) -> Path:
  """`path` as a Path, or CheckpointError if it is missing or a directory."""
  path = Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
  if path.is_dir():
    raise CheckpointError(f"{path}: is a directory; for a diffusers folder use "
                          "read_diffusers_folder(), otherwise pass a checkpoint file")
  return path


def _unpickle(file, storages, what, seen=None):
  try:
    unpickler = _SafeUnpickler(file, storages, what)
    unpickler.seen = seen if seen is not None else {}
    return unpickler.load()
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f"{what}: {e}") from None
  except CheckpointError:
    raise
  except Exception as e:  # malformed pickles raise anything from EOFError to TypeError
    raise CheckpointError(f"{what}: cannot unpickle ({type(e).__name__}: {e})") from None


def _load_zip(path: Path) -> Any:
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
                            f"(found {pkls}); not a torch checkpoint")
    prefix = pkls[0][:-len("data.pkl")]
    try:
      big = prefix + "byteorder" in names and zf.read(prefix + "byteorder") == b"big"
      infos = {i.filename[len(prefix) + 5:]: i for i in zf.infolist()
               if i.filename.startswith(prefix + "data/")}
      storages = _ZipStorages(zf, infos, big, path)
      return _unpickle(zf.open(pkls[0]), storages, str(path))
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
      raise CheckpointError(f"{path}: corrupt zip member ({e}); re-download the checkpoint") from None


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
  size = path.stat().st_size
  with open(path, "rb") as f:
    what = str(path)
    if _unpickle(f, None, what) != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
    _unpickle(f, None, what)  # protocol version
    sys_info = _unpickle(f, None, what)
    big = isinstance(sys_info, dict) and not sys_info.get("little_endian", True)
    start = f.tell()
    # Pass 1: walk the main pickle only to learn each storage's dtype and reach the data section.
    dtypes: dict[str, np.dtype] = {}
    _unpickle(f, None, what, seen=dtypes)
    keys = _unpickle(f, None, what)
    storages = {}
    for key in keys:
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path}: truncated legacy checkpoint (storage {key})")
      dtype = np.dtype(dtypes.get(str(key), np.uint8))
      nbytes = struct.unpack("<q", head)[0] * dtype.itemsize
      if not 0 <= nbytes <= size - f.tell():  # checked before allocating
        raise CheckpointError(f"{path}: truncated legacy checkpoint (storage {key})")
      raw = np.frombuffer(bytearray(f.read(nbytes)), np.uint8)
      if raw.size != nbytes:
        raise CheckpointError(f"{path}: truncated legacy checkpoint (storage {key})")
      storages[str(key)] = _Storage(raw, big)
    f.seek(start)
    return _unpickle(f, storages, what)  # pass 2, with the data


def load_torch_checkpoint(path) -> Any:
  """Loads a `torch.save` file (zip or legacy format) with tensors as numpy arrays.

  Only tensor rebuilders, storages, dtypes, `OrderedDict`, `torch.Size` and plain builtins are
  resolved; other globals load as `OpaqueGlobal` placeholders and calling one raises
  `UnsafeCheckpointError`. Raises CheckpointError naming `path` for anything malformed.
  """
  path = check_file(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if head == _ZIP_MAGIC:
    return _load_zip(path)
  if head[:1] == b"\x80":  # a pickle protocol marker: the legacy format
    return _load_legacy(path)
  if head[:2] == b"\x1f\x8b" or head.startswith(b"stor"):
    raise CheckpointError(f"{path}: compressed or pre-0.4 tar checkpoints are not supported")
  raise CheckpointError(f"{path}: not a torch checkpoint (starts with {head!r})")


# ---------------------------------------------------------------------------------------------------
