"""numpy objects inside torch pickles, recorded while unpickling and rebuilt only from checked data.

numpy pickles an array as `_reconstruct(ndarray, (0,), b'b')` followed by a BUILD whose state is
(1, shape, dtype, is_fortran, raw bytes), and a dtype as `numpy.dtype('f4', False, True)` + BUILD
(byte order, sub-array, field names, fields, item size, alignment, flags). numpy trusts that state:
a structured dtype with an object field and flags 0 turns file bytes into an object pointer, a
field offset past the item size reads heap memory. So the allow-listed `numpy.dtype` and
`_reconstruct` here return inert `_Unbuilt` records; BUILD only stores their state. Once the
pickle is read, `finish` replaces each record with the numpy object rebuilt by us: the dtype only
if its state is exactly that of a plain numeric dtype (`checkpoint_limits.NUMERIC_DTYPES`) in some
byte order, the array as a read-only view of the pickle's bytes, their length equal to
shape x itemsize. numpy scalars are built the same way, from exactly one item's bytes.
"""

import math

import numpy as np

from ldm_jax.convert.checkpoint_limits import (ML_DTYPES, NUMERIC_DTYPES, CheckpointError,
                                               LoadBudget, Sentinel, UnsafeCheckpointError, brief,
                                               check_shape)

# numpy.dtype(name) names a plain numeric dtype by its type string ('f4', 'b1', 'c8', ...);
# ml_dtypes floats by their class (GLOBAL ml_dtypes.bfloat16), which find_class maps to these.
_NUMPY_NAMES = {d.str[1:]: d for d in NUMERIC_DTYPES if d.kind in "biufc" and d not in
                ML_DTYPES.values()}
ML_DTYPE_GLOBALS = {f"ml_dtypes.{k}": Sentinel(f"ml_dtypes.{k}") for k in ML_DTYPES}


class _Unbuilt:
  """A numpy object the pickle declares, kept as inert data until `finish` checks and rebuilds it.
  BUILD (the pickle's way of setting numpy state) may run once and only records."""
  __slots__ = ("state", "built")
  kind = "numpy object"

  def __init__(self):
    self.state, self.built = None, False

  def __setstate__(self, state):
    if self.built:
      raise CheckpointError(f"BUILD applied twice to one {self.kind}")
    self.state, self.built = state, True


class _UnbuiltDtype(_Unbuilt):
  """numpy.dtype(name, align, copy) + its BUILD state."""
  __slots__ = ("base",)
  kind = "numpy dtype"

  def __init__(self, base: np.dtype):
    super().__init__()
    self.base = base

  def resolve(self) -> np.dtype:
    """The dtype, if the state is exactly that of the plain dtype in some byte order."""
    if not self.built:
      return self.base
    # numpy's own state of the plain dtype: (3, byteorder, subarray, names, fields, elsize,
    # alignment, flags). Everything but the byte order must equal it, type included.
    want, state = self.base.__reduce__()[2], self.state
    ok = (type(state) is tuple and len(state) == len(want) and state[1] in ("<", ">", "=", "|")
          and all(type(s) is type(w) and s == w
                  for i, (s, w) in enumerate(zip(state, want)) if i != 1))
    if not ok:
      raise CheckpointError(f"numpy dtype {self.base} with state {brief(state)}: only plain "
                            f"numeric dtypes are accepted (no fields, sub-arrays or objects; "
                            f"state {want})")
    return self.base.newbyteorder(">") if state[1] == ">" and self.base.itemsize > 1 else self.base


class _UnbuiltArray(_Unbuilt):
  """_reconstruct(ndarray, ...) + its BUILD state (1, shape, dtype, is_fortran, raw bytes)."""
  __slots__ = ()
  kind = "numpy array"

  def resolve(self, budget: LoadBudget) -> np.ndarray:
    state = self.state
    if not self.built or type(state) is not tuple or len(state) != 5 or state[0] != 1:
      raise CheckpointError(f"numpy array with state {brief(state)}; expected "
                            "(1, shape, dtype, is_fortran, bytes)")
    _, shape, dtype, fortran, raw = state
    shape = check_shape(shape, "numpy array shape")
    if not isinstance(dtype, _UnbuiltDtype) or type(fortran) is not bool:
      raise CheckpointError(f"numpy array dtype {brief(dtype)} / order {brief(fortran)}: "
                            "expected a numpy.dtype and a bool")
    dtype = dtype.resolve()
    nbytes = math.prod(shape) * dtype.itemsize
    if not isinstance(raw, bytes) or len(raw) != nbytes:
      raise CheckpointError(f"numpy array of shape {shape} and dtype {dtype} needs {nbytes} bytes "
                            f"of data, got {brief(raw)}")
    # A view of the pickle's own bytes object: read-only, nothing copied.
    array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
    if not dtype.isnative:
      budget.charge(nbytes, "byte-swapping a big-endian numpy array")
      array = array.astype(dtype.newbyteorder("="))
      array.flags.writeable = False
    return array


def np_dtype(budget: LoadBudget, name, align=False, copy=False) -> _UnbuiltDtype:
  """numpy.dtype as the pickle calls it."""
  if isinstance(name, str) and name in _NUMPY_NAMES:
    base = _NUMPY_NAMES[name]
  elif isinstance(name, Sentinel) and name.name in ML_DTYPE_GLOBALS:
    base = ML_DTYPES[name.name.split(".", 1)[1]]
  else:
    raise UnsafeCheckpointError(f"refusing numpy.dtype({brief(name)}): only plain numeric dtypes "
                                f"({sorted(_NUMPY_NAMES)} and ml_dtypes floats) are accepted")
  budget.pending += 1
  return _UnbuiltDtype(base)


def np_scalar(budget: LoadBudget, dtype, data=None):
  """numpy.core.multiarray.scalar(dtype, bytes): its dtype is already built when it is called."""
  if not isinstance(dtype, _UnbuiltDtype):
    raise UnsafeCheckpointError(f"refusing numpy scalar of dtype {brief(dtype)}")
  dtype = dtype.resolve()
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise CheckpointError(f"numpy {dtype} scalar from {brief(data)}: expected {dtype.itemsize} "
                          "bytes")
  return np.frombuffer(data, dtype)[0]


def np_reconstruct(budget: LoadBudget, cls, shape, typecode) -> _UnbuiltArray:
  """numpy.core.multiarray._reconstruct: only of numpy.ndarray (`ndarray`, the sentinel)."""
  if cls is not NDARRAY:
    raise UnsafeCheckpointError(f"numpy _reconstruct of {brief(cls)}, not numpy.ndarray")
  budget.pending += 1
  return _UnbuiltArray()


NDARRAY = Sentinel("numpy.ndarray")  # allowed only as the class argument of _reconstruct
_IN_PROGRESS = object()
_MAX_DEPTH = 200


def finish(obj, budget: LoadBudget, memo: dict | None = None, depth: int = 0):
  """`obj` with every _Unbuilt replaced by its checked numpy object; lists, dicts, sets and
  instance attributes are updated in place (shared references stay shared), tuples rebuilt."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    if memo[id(obj)] is _IN_PROGRESS:
      raise CheckpointError("a tuple that contains itself alongside numpy objects is not supported")
    return memo[id(obj)]
  if depth > _MAX_DEPTH:
    raise CheckpointError(f"data nested more than {_MAX_DEPTH} deep alongside numpy objects is "
                          "not supported")

  def sub(x):
    return finish(x, budget, memo, depth + 1)

  attrs = getattr(obj, "__dict__", None)
  if isinstance(obj, _UnbuiltDtype):
    out = obj.resolve()
  elif isinstance(obj, _UnbuiltArray):
    out = obj.resolve(budget)
  elif isinstance(obj, (list, dict, set)) or type(attrs) is dict:
    memo[id(obj)] = out = obj  # before the contents: they may refer back to obj
    if isinstance(obj, list):
      obj[:] = [sub(x) for x in obj]
    elif isinstance(obj, (dict, set)):
      items = [(sub(k), sub(v)) for k, v in obj.items()] if isinstance(obj, dict) else \
          [sub(x) for x in obj]
      keys = [k for k, _ in items] if isinstance(obj, dict) else items
      if any(isinstance(k, np.ndarray) for k in keys):
        raise CheckpointError("a numpy array used as a dict key or set item is not supported")
      obj.clear()
      obj.update(items)
    if type(attrs) is dict:  # OpaqueGlobal instances; attributes BUILD set on an OrderedDict
      for k, v in list(attrs.items()):
        attrs[k] = sub(v)
  elif isinstance(obj, (tuple, frozenset, slice)):
    memo[id(obj)] = _IN_PROGRESS
    parts = (obj.start, obj.stop, obj.step) if isinstance(obj, slice) else tuple(obj)
    new = [sub(x) for x in parts]
    if all(a is b for a, b in zip(new, parts)):
      out = obj
    elif isinstance(obj, frozenset):
      if any(isinstance(x, np.ndarray) for x in new):
        raise CheckpointError("a numpy array inside a frozenset is not supported")
      out = frozenset(new)
    else:
      out = slice(*new) if isinstance(obj, slice) else tuple(new)
  else:
    out = obj
  memo[id(obj)] = out
  return out
