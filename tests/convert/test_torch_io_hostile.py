"""Hostile weight files: every loader either returns plain numeric arrays or raises CheckpointError
naming the file; never another exception, never a crash, never memory far beyond the file's size.

The attacks that crash or exhaust a process run in a child process (`hostile_worker.py`) with its
address space capped, so a regression fails the test instead of killing pytest. The fuzz test
mutates valid zip / legacy `.ckpt` and `.safetensors` files for a bounded time in one such child.
"""

import collections
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from ldm_jax.convert import common, torch_io
from ldm_jax.convert.torch_io import CheckpointError, UnsafeCheckpointError

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile_worker.py")


def _in_child(fn: str, path, timeout: float = 120) -> dict:
  """The outcome of `torch_io.<fn>(path)` in a memory-capped child process."""
  r = subprocess.run([sys.executable, WORKER, "load", fn, str(path)], capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, f"the loader process died (exit {r.returncode}): {r.stderr[-3000:]}"
  return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Hand-made pickles
# ---------------------------------------------------------------------------------------------------

class _Reduce:
  """Pickles as `fn(*args)`, then BUILD with `state` when given."""

  def __init__(self, fn, args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class _StorageRef:
  def __init__(self, key: str, numel: int, cls=torch.FloatStorage):
    self.key, self.numel, self.cls = key, numel, cls


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", obj.cls, obj.key, "cpu", obj.numel)
    return None


def _tensor(ref, offset, size, stride):
  return _Reduce(torch._utils._rebuild_tensor_v2,
                 (ref, offset, size, stride, False, collections.OrderedDict()))


def _pickled(obj) -> bytes:
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _write_ckpt(path, obj, storages=None, data_pkl=None, compress=()):
  """A torch zip checkpoint holding `obj` (or raw `data_pkl` bytes) and {key: bytes} storages."""
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", _pickled(obj) if data_pkl is None else data_pkl)
    for key, body in (storages or {}).items():
      name = f"archive/data/{key}"
      zf.writestr(name, body, zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)
  return path


def _np_array(shape, dtype_reduce, raw, fortran=False):
  return _Reduce(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                 (1, shape, dtype_reduce, fortran, raw))


def _write_safetensors(path, header: dict | list | str, body: bytes = b""):
  raw = (header if isinstance(header, str) else json.dumps(header)).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
  return path


# ---------------------------------------------------------------------------------------------------
# Memory corruption through numpy state
# ---------------------------------------------------------------------------------------------------

def test_object_field_dtype_is_refused(tmp_path):
  """A structured dtype with an object field and flags 0 would make numpy read 8 file bytes as a
  PyObject pointer (SIGSEGV on first use). Both spellings (a void dtype, or 'f4' re-stated by
  BUILD) are refused."""
  obj_field = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 8, 0)
  for name in ("V8", "f4"):
    evil = _np_array((1,), _Reduce(np.dtype, (name, False, True), obj_field), b"A" * 8)
    path = _write_ckpt(tmp_path / f"object_{name}.ckpt", {"state_dict": {"w": evil}})
    result = _in_child("load_state_dict", path)
    assert result["kind"] == "refused", result
    assert "numpy.dtype('V8')" in result["detail"] if name == "V8" else \
        "only plain numeric dtypes" in result["detail"]


def test_field_offset_past_itemsize_is_refused(tmp_path):
  """A field at offset 4096 of a 4-byte item would read heap memory past the buffer into the
  weights, silently."""
  state = (3, "<", None, ("a",), {"a": (np.dtype("f4"), 4096)}, 4, 4, 0)
  evil = _np_array((4,), _Reduce(np.dtype, ("f4", False, True), state), b"\x00" * 16)
  path = _write_ckpt(tmp_path / "offset.ckpt", {"state_dict": {"w": evil}})
  result = _in_child("load_state_dict", path)
  assert result["kind"] == "refused" and "only plain numeric dtypes" in result["detail"], result


def test_convert_cli_refuses_the_object_dtype_file(tmp_path):
  """`python -m ldm_jax.convert` on the object-dtype .ckpt: one line naming the file, exit 2."""
  obj_field = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 8, 0)
  evil = _np_array((1,), _Reduce(np.dtype, ("f4", False, True), obj_field), b"A" * 8)
  path = _write_ckpt(tmp_path / "evil.ckpt", {"state_dict": {"w": evil}})
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  yaml_path = os.path.join(repo, "tests", "convert", "fixtures", "sd_v1_inference.yaml")
  r = subprocess.run([sys.executable, "-m", "ldm_jax.convert", "--compvis_ckpt", str(path),
                      "--compvis_yaml", yaml_path, "--out", str(tmp_path / "out")],
                     capture_output=True, text=True, timeout=300, cwd=repo,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert str(path) in r.stderr and "only plain numeric dtypes" in r.stderr
  assert not (tmp_path / "out").exists()


def test_build_on_a_tensor_cannot_reach_numpy_setstate(tmp_path):
  """BUILD right after a tensor would call ndarray.__setstate__ on our view of the storage; no real
  numpy dtype is reachable inside the pickle, so it fails as a CheckpointError."""
  state = (1, (2,), _Reduce(np.dtype, ("f4", False, True)), False, b"\x00" * 8)
  evil = _Reduce(torch._utils._rebuild_tensor_v2,
                 (_StorageRef("0", 1), 0, (1,), (1,), False, collections.OrderedDict()), state)
  path = _write_ckpt(tmp_path / "build.ckpt", {"w": evil}, {"0": b"\x00" * 4})
  with pytest.raises(CheckpointError, match="build.ckpt"):
    torch_io.load_torch_checkpoint(path)


def test_plain_numpy_arrays_and_scalars_load_exactly(tmp_path):
  """What numpy itself pickles (C and Fortran order, big-endian, bf16, scalars) still loads, as
  read-only arrays of the same values, in native byte order."""
  values = {"c": np.arange(6, dtype=np.int16).reshape(2, 3),
            "f": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
            "big": np.arange(5, dtype=">i4"), "bf16": np.arange(4).astype(ml_dtypes.bfloat16),
            "bool": np.array([True, False]), "empty": np.zeros((0, 3), np.float64),
            "scalar": np.float64(0.25), "dtype": np.dtype("float16")}
  path = tmp_path / "numpy.ckpt"
  torch.save({"numpy": values}, path)
  got = torch_io.load_torch_checkpoint(path)["numpy"]
  for key, want in values.items():
    if key == "dtype":
      assert got[key] == want
      continue
    assert got[key].dtype == want.dtype.newbyteorder("="), key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
    if isinstance(got[key], np.ndarray):
      assert not got[key].flags.writeable, key


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_containers_still_load(tmp_path, zip_format):
  """The allow-listed constructors now check and charge their arguments; what torch.save writes
  for ordinary data still loads as the same values."""
  values = {"dd": collections.defaultdict(list, a=[1]), "counter": collections.Counter("abb"),
            "od": collections.OrderedDict(x=1), "set": {1, 2}, "frozenset": frozenset([3]),
            "bytes": b"", "more_bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
            "complex": 1 + 2j,
            "slice": slice(1, None, 2), "size": torch.Size([2, 3]), "cuda": torch.device("cuda", 1),
            "cpu": torch.device("cpu"), "dtype": torch.bfloat16}
  path = tmp_path / "plain.pt"
  torch.save(values, path, _use_new_zipfile_serialization=zip_format)
  got = torch_io.load_torch_checkpoint(path)
  want = dict(values, dd={"a": [1]}, counter={"a": 1, "b": 2}, size=(2, 3), cuda="cuda:1",
              cpu="cpu", dtype="torch.bfloat16")
  assert got == want


# ---------------------------------------------------------------------------------------------------
# Memory bombs
# ---------------------------------------------------------------------------------------------------

def test_zero_stride_bomb_is_refused(tmp_path):
  """A few hundred bytes declaring 2^30 floats with stride 0 over one float: a 4 GiB copy."""
  bomb = _tensor(_StorageRef("0", 1), 0, (1 << 30,), (0,))
  path = _write_ckpt(tmp_path / "stride0.ckpt", {"w": bomb}, {"0": b"\x00" * 4})
  assert path.stat().st_size < 1000
  result = _in_child("load_state_dict", path)
  assert result["kind"] == "refused" and "memory bomb" in result["detail"], result


def test_small_expanded_tensor_is_a_read_only_view(tmp_path):
  """expand() is legitimate: within the budget it loads as a view of its storage, not a copy."""
  path = tmp_path / "expand.ckpt"
  base = torch.arange(3.0)
  torch.save({"e": base[None].expand(4, 3), "b": base}, path)
  sd = torch_io.load_state_dict(path)
  np.testing.assert_array_equal(sd["e"], np.tile(np.arange(3.0, dtype=np.float32), (4, 1)))
  assert np.shares_memory(sd["e"], sd["b"]) and not sd["e"].flags.writeable


def test_overlapping_safetensors_ranges_are_refused(tmp_path):
  """4096 header entries over the same byte range would materialise 4096 copies."""
  header = {f"t{i}": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]}
            for i in range(4096)}
  path = _write_safetensors(tmp_path / "overlap.safetensors", header, b"\x00" * 1024)
  with pytest.raises(CheckpointError, match="overlap") as info:
    torch_io.load_safetensors(path)
  assert str(path) in str(info.value)


def test_compressed_zip_member_is_refused(tmp_path):
  """A deflated member expands ~1000x; torch never compresses, so it is refused unread."""
  path = _write_ckpt(tmp_path / "deflate.ckpt", {"w": _tensor(_StorageRef("0", 1 << 21), 0,
                                                              (1 << 21,), (1,))},
                     {"0": bytes(8 << 20)}, compress={"archive/data/0"})
  assert path.stat().st_size < 100_000
  result = _in_child("load_state_dict", path)
  assert result["kind"] == "refused" and "compressed" in result["detail"], result


def test_zip_entries_sharing_bytes_are_refused(tmp_path):
  """64 central-directory entries declaring the same 4 KiB of the file: read once each, they
  would hold 64 x what the file has. The declared sizes add up past the file: refused unread."""
  storages = {str(k): (bytes(range(256)) * 16 if k == 0 else b"") for k in range(64)}
  obj = {f"w{k}": _tensor(_StorageRef(str(k), 1024), 0, (1024,), (1,)) for k in range(64)}
  path = _write_ckpt(tmp_path / "shared.ckpt", obj, storages)
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    first = zf.getinfo("archive/data/0")
  pos = data.find(b"PK\x01\x02")
  while pos >= 0:  # every storage entry now declares the first storage's bytes
    name_len = struct.unpack_from("<H", data, pos + 28)[0]
    if data[pos + 46:pos + 46 + name_len].startswith(b"archive/data/"):
      struct.pack_into("<III", data, pos + 16, first.CRC, first.file_size, first.file_size)
      struct.pack_into("<I", data, pos + 42, first.header_offset)
    pos = data.find(b"PK\x01\x02", pos + 46)
  path.write_bytes(bytes(data))
  assert path.stat().st_size < 64 * 4096
  with pytest.raises(CheckpointError, match="overlap") as info:
    torch_io.load_state_dict(path)
  assert str(path) in str(info.value)


def test_pickle_amplification_is_capped(tmp_path):
  """bytearray(2^30) from a 5-byte int, and one 1 MiB string re-encoded 100 times, are refused."""
  path = _write_ckpt(tmp_path / "bytearray.ckpt", None,
                     data_pkl=b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.")
  with pytest.raises(UnsafeCheckpointError, match="bytearray"):
    torch_io.load_torch_checkpoint(path)

  text = "x" * (1 << 20)
  body = (b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text.encode() +
          b"q\x01(" + b"h\x00h\x01\x85R" * 100 + b"l.")
  path = _write_ckpt(tmp_path / "encode.ckpt", None, data_pkl=body)
  result = _in_child("load_torch_checkpoint", path)
  assert result["kind"] == "refused" and "memory bomb" in result["detail"], result


@pytest.mark.parametrize("case", ["memo_index", "counted_length", "empty_sets"])
def test_pickle_opcode_bombs_are_refused(tmp_path, case):
  """Opcodes CPython's unpickler trusts: LONG_BINPUT 2^32 - 16 allocates and zeroes a 64 GiB memo
  table; BINBYTES8 2^40 allocates before reading; a million EMPTY_SETs (1 byte each) build
  224 MB."""
  data_pkl = {
      "memo_index": b"\x80\x02Nr\xf0\xff\xff\xff.",
      "counted_length": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"xx.",
      "empty_sets": b"\x80\x04(" + b"\x8f" * (1 << 20) + b"l.",
  }[case]
  path = _write_ckpt(tmp_path / f"{case}.ckpt", None, data_pkl=data_pkl)
  result = _in_child("load_torch_checkpoint", path)
  assert result["kind"] == "refused", result
  assert {"memo_index": "memo index", "counted_length": "bytes8",
          "empty_sets": "memory bomb"}[case] in result["detail"], result


def test_strict_load_copies_only_matched_tensors():
  """A 4 GiB zero-stride view whose shape the model does not take is reported, never copied."""
  bomb = np.broadcast_to(np.float32(1), (1 << 30,))
  template = {"w": np.zeros((3,), np.float32)}
  tracemalloc.start()
  try:
    with pytest.raises(common.WeightLoadError, match="shape mismatches"):
      common.strict_load(template, {"w": bomb}, lambda p: ("/".join(p), common.identity),
                         what="tiny")
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
  finally:
    tracemalloc.stop()


def test_legacy_attention_fusion_copies_only_fitting_tensors(monkeypatch):
  """unet_from_diffusers stacks to_q/k/v into qkv before strict_load: only tensors of the layer's
  own shape are stacked; zero-stride views of 64 MiB are left for strict_load to report,
  uncopied."""
  from ldm_jax.convert import unet as convert_unet
  from ldm_jax.models.unet import Layer
  layer = Layer(kind="attention", stage="middle", block=1, pos=1, level=0, index=0, channels=4,
                heads=2)
  monkeypatch.setattr(convert_unet, "_positions", lambda model: {"m": (layer, "", "mid.attn")})
  keys = [f"mid.attn.to_{n}.weight" for n in "qkv"]
  fits = {k: np.full((4, 4), i, np.float32) for i, k in enumerate(keys)}
  fused = convert_unet._fuse_legacy_qkv(fits, model=None)
  assert set(fused) == {"mid.attn.qkv.weight"} and fused["mid.attn.qkv.weight"].shape == (12, 4)
  bomb = {k: np.broadcast_to(np.float32(0), (1 << 12, 1 << 12)) for k in keys}
  tracemalloc.start()
  try:
    left = convert_unet._fuse_legacy_qkv(bomb, model=None)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
  finally:
    tracemalloc.stop()
  assert set(left) == set(keys)


# ---------------------------------------------------------------------------------------------------
# Malformed structure: CheckpointError naming the file, never TypeError / RecursionError / ...
# ---------------------------------------------------------------------------------------------------

def _legacy_with_keys(path, keys_pickle: bytes):
  """A legacy checkpoint whose storage-key list (the fifth pickle) is replaced."""
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  f, ends = io.BytesIO(data), []
  for _ in range(5):
    for _ in pickletools.genops(f):
      pass
    ends.append(f.tell())
  path.write_bytes(data[:ends[3]] + keys_pickle + data[ends[4]:])
  return path


@pytest.mark.parametrize("case", ["header_list", "deep_json", "infinity_offset", "float_shape",
                                  "huge_header_length", "legacy_keys_int", "legacy_keys_huge",
                                  "index_self", "index_cycle", "index_escape", "index_list",
                                  "device_list", "not_a_file"])
def test_malformed_files_raise_checkpoint_error(tmp_path, case):
  st = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
  make = {
      "header_list": lambda p: _write_safetensors(p, [st], b"\x00" * 4),
      "deep_json": lambda p: _write_safetensors(p, "[" * 50_000 + "]" * 50_000),
      "infinity_offset": lambda p: _write_safetensors(
          p, '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', b"\0" * 4),
      "float_shape": lambda p: _write_safetensors(
          p, {"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
      "huge_header_length": lambda p: p.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}"),
      "legacy_keys_int": lambda p: _legacy_with_keys(p, pickle.dumps(7, protocol=2)),
      "legacy_keys_huge": lambda p: _legacy_with_keys(p, pickle.dumps([str(2**70)], protocol=2)),
      "index_self": lambda p: p.write_text(json.dumps({"weight_map": {"w": p.name}})),
      "index_cycle": lambda p: (p.write_text(json.dumps({"weight_map": {"w": "b.index.json"}})),
                                (p.parent / "b.index.json").write_text(
                                    json.dumps({"weight_map": {"w": p.name}}))),
      "index_escape": lambda p: p.write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}})),
      "index_list": lambda p: p.write_text("[1, 2]"),
      "device_list": lambda p: _write_ckpt(p, None, data_pkl=(
          b"\x80\x02ctorch\ndevice\nX\x03\x00\x00\x00cpuq\x00(" + b"h\x00" * 1000 + b"l\x85R.")),
      "not_a_file": lambda p: os.mkfifo(p),
  }[case]
  suffix = {"index": ".index.json", "legacy": ".ckpt", "device": ".ckpt", "not": ".ckpt"}
  path = tmp_path / ("model" + next((v for k, v in suffix.items() if case.startswith(k)),
                                    ".safetensors"))
  make(path)
  with pytest.raises(CheckpointError) as info:
    torch_io.load_state_dict(path)
  assert str(path) in str(info.value), info.value


def test_diffusers_component_names_stay_in_the_folder(tmp_path):
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "scheduler_config.json").write_text("{}")
  folder = tmp_path / "pipe"
  folder.mkdir()
  (folder / "model_index.json").write_text(json.dumps({"../outside": ["diffusers", "DDIM"]}))
  with pytest.raises(CheckpointError, match="not a sub-folder name") as info:
    torch_io.read_diffusers_folder(folder)
  assert str(folder) in str(info.value)


def test_scale_factor_that_is_not_a_number():
  with pytest.raises(CheckpointError, match="scale_factor"):
    torch_io.split_compvis_state_dict({"scale_factor": np.zeros((2, 2), np.float32)})


# ---------------------------------------------------------------------------------------------------
# Fuzz
# ---------------------------------------------------------------------------------------------------

def _seed_files(folder):
  """Small valid files in each format, with the features mutations should reach."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  sd = collections.OrderedDict([
      ("w", base), ("w_t", base.t()), ("w_slice", base[1:3, ::2]), ("e", base[:1].expand(3, 6)),
      ("h", torch.randn(3, generator=g).half()), ("bf", torch.randn(2, 2).to(torch.bfloat16)),
      ("i", torch.arange(5)), ("b", torch.tensor([True, False])), ("s", torch.tensor(2.0)),
      ("z", torch.zeros(0, 3))])
  obj = {"state_dict": sd, "step": 3, "size": torch.Size([2, 3]), "dev": torch.device("cpu"),
         "np": {"a": np.arange(4, dtype=np.int16).reshape(2, 2), "s": np.float32(1.5)},
         "misc": [{1, 2}, frozenset([3]), b"bytes", bytearray(b"ba"), 1 + 2j, slice(1, 2)]}
  files = {"zip": folder / "seed.ckpt", "legacy": folder / "seed_legacy.ckpt",
           "safetensors": folder / "seed.safetensors"}
  torch.save(obj, files["zip"])
  torch.save(obj, files["legacy"], _use_new_zipfile_serialization=False)
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
  return files


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_fuzzed_files_load_or_raise_checkpoint_error(tmp_path, fmt):
  """Seeded mutants of valid files (flipped bytes, spliced opcodes, edited ints, headers and zip
  members) for ~6 s per format: each loads as numeric read-only arrays or raises CheckpointError
  naming the file; the child neither crashes nor exceeds its memory cap."""
  seed = _seed_files(tmp_path)[fmt]
  ok = _in_child("load_state_dict" if fmt == "safetensors" else "load_torch_checkpoint", seed)
  assert ok["kind"] == "loaded", ok  # the seed itself is valid
  out = tmp_path / "out"
  out.mkdir()
  r = subprocess.run([sys.executable, WORKER, "fuzz", str(seed), str(out), "6", "1234"],
                     capture_output=True, text=True, timeout=300)
  if r.returncode != 0:
    recipe = (out / "mutant.txt").read_text() if (out / "mutant.txt").exists() else "?"
    pytest.fail(f"the loader process died (exit {r.returncode}) on {recipe.strip()}; the file is "
                f"kept in {out}: {r.stderr[-3000:]}")
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert not summary["failures"], json.dumps(summary["failures"], indent=1)
  assert summary["mutants"] >= 200, summary
  # Mutations must reach both sides: some mutants still load, most are refused.
  assert summary["counts"]["loaded"] > 0 and summary["counts"]["refused"] > 0, summary
