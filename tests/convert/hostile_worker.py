"""Runs the checkpoint loaders on hostile files in a child process, under a memory cap.

    python hostile_worker.py load <function> <file>   one load; prints one JSON outcome line
    python hostile_worker.py fuzz <seed file> <out dir> <seconds> <seed>
        mutates the seed file again and again (`mutate_*`), loads every mutant, prints a JSON
        summary; the mutant being loaded is always at <out dir>/mutant.<ext> (its recipe in
        mutant.txt), so when this process crashes the test can keep both for reproduction.

The address space is capped at what the process had after its imports plus CAP_MIB, so a load that
would materialise more than that fails with MemoryError; the loaders turn it into a CheckpointError
whose message names MemoryError, which `outcome` counts as a failure, like any exception other than
a CheckpointError naming the file, or an array that is not plain numbers or not read-only.
"""

import io
import json
import os
import pickletools
import random
import resource
import struct
import sys
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from ldm_jax.convert import torch_io  # noqa: E402
from ldm_jax.convert.checkpoint_limits import is_numeric  # noqa: E402

CAP_MIB = 64  # the 16 MiB budget floor, 4 x these small files, room for the interpreter


def cap_memory():
  with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
  limit = vm + (CAP_MIB << 20)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _bad_values(obj) -> str | None:
  """The first thing in a loaded object that is not plain data with numeric arrays, else None."""
  stack, seen = [obj], set()
  while stack:
    x = stack.pop()
    if id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, (np.ndarray, np.generic)):
      if not is_numeric(x.dtype):
        return f"array of dtype {x.dtype}"
      if isinstance(x, np.ndarray) and x.flags.writeable:
        return "writeable array"
    elif isinstance(x, dict):
      stack.extend(x.keys())
      stack.extend(x.values())
    elif isinstance(x, (list, tuple, set, frozenset)):
      stack.extend(x)
    elif isinstance(x, torch_io.OpaqueGlobal):
      stack.extend([x.opaque_args, x.opaque_state])
    elif type(x).__name__.startswith("_Unbuilt"):
      return f"numpy object never rebuilt: {type(x).__name__}"
  return None


def outcome(fn, path) -> dict:
  """{'ok': bool, 'kind': 'loaded' | 'refused' | 'failed', 'detail': str} for one load."""
  try:
    result = getattr(torch_io, fn)(path)
  except torch_io.CheckpointError as e:
    text = str(e)
    if str(path) not in text:
      return dict(ok=False, kind="failed", detail=f"message does not name the file: {text[:1000]}")
    if "MemoryError" in text:
      return dict(ok=False, kind="failed", detail=f"ran out of memory: {text[:1000]}")
    return dict(ok=True, kind="refused", detail=text[:1000])
  except BaseException as e:  # noqa: BLE001  (what the test exists to catch)
    return dict(ok=False, kind="failed", detail=f"{type(e).__name__}: {str(e)[:1000]}")
  bad = _bad_values(result)
  if bad:
    return dict(ok=False, kind="failed", detail=f"returned {bad}")
  if fn == "load_state_dict" and not all(isinstance(v, np.ndarray) for v in result.values()):
    return dict(ok=False, kind="failed", detail="state dict value that is not an array")
  return dict(ok=True, kind="loaded", detail="")


# ---------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------

# Opcodes and snippets worth splicing into a pickle: calls, builds, containers, odd ints, globals.
_SNIPPETS = [b"R", b"b", b"0", b"2", b"(", b"t", b"l", b"]", b"}", b"e", b"s", b"u", b"a", b"N",
             b"\x85", b"\x86", b"\x87", b")", b"\x88", b"\x89", b"h\x00", b"h\x01", b"q\x00", b"Q",
             b"K\x00", b"K\x01", b"J\xff\xff\xff\xff", b"J\xff\xff\xff\x7f", b"M\xff\xff",
             b"\x8a\x08" + b"\xff" * 7 + b"\x7f", b"\x8a\x01\x00",
             b"\x8a\x09" + b"\x00" * 8 + b"\x01",
             b"G\x7f\xf0\x00\x00\x00\x00\x00\x00", b"X\xff\xff\xff\x7f", b"T\x00\x00\x00\x40",
             b"c__builtin__\nbytearray\n", b"cnumpy\ndtype\n", b"cbuiltins\nset\n",
             b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\ndevice\n",
             b"ccollections\nOrderedDict\n",
             b"cnumpy.core.multiarray\n_reconstruct\n", b"cos\nsystem\n", b"c_codecs\nencode\n"]
_INTS = [0, 1, -1, 2, 255, 256, 2**16, 2**30, 2**31 - 1, 2**32, 2**62, 2**63 - 1, -2**31]


def _pickle_ops(data: bytes) -> list[tuple[int, int]]:
  """(start, end) of each opcode of the first pickle in `data` (the seed is well-formed)."""
  ops = [pos for _, _, pos in pickletools.genops(io.BytesIO(data))]
  return list(zip(ops, ops[1:] + [len(data)]))


def _encode_int(v: int) -> bytes:
  if 0 <= v < 256:
    return b"K" + bytes([v])
  if -2**31 <= v < 2**31:
    return b"J" + struct.pack("<i", v)
  raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw


def mutate_pickle(data: bytes, rng: random.Random, ops=None) -> tuple[bytes, str]:
  """A pickle with flipped bytes, spliced opcodes or edited ints."""
  ops = ops or _pickle_ops(data)
  choice = rng.randrange(6)
  if choice == 0:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
      b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b), "flip bits"
  a, b = sorted(rng.sample(range(len(ops)), 2))
  (s1, e1), (s2, e2) = ops[a], ops[b]
  if choice == 1:
    return data[:s1] + data[e2:], f"delete ops {a}..{b}"
  if choice == 2:
    return data[:e2] + data[s1:e2] + data[e2:], f"duplicate ops {a}..{b}"
  if choice == 3:
    snippet = rng.choice(_SNIPPETS)
    return data[:s1] + snippet + data[s1:], f"insert {snippet!r} at op {a}"
  if choice == 4:
    ints = [(s, e) for s, e in ops if data[s:s + 1] in (b"K", b"M", b"J", b"\x8a")]
    if ints:
      s, e = rng.choice(ints)
      v = rng.choice(_INTS)
      return data[:s] + _encode_int(v) + data[e:], f"int at {s} -> {v}"
  return data[:s1] + data[s2:e2] + data[e1:s2] + data[s1:e1] + data[e2:], f"swap ops {a}, {b}"


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _write_zip(members, deflate=()) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as zf:
    for name, body in members:
      zf.writestr(name, body, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
  return out.getvalue()


def mutate_zip(data: bytes, members, rng: random.Random, ops) -> tuple[bytes, str]:
  """A torch zip checkpoint with a mutated data.pkl, storage or archive structure."""
  choice = rng.randrange(10)
  pkl = next(i for i, (n, _) in enumerate(members) if n.endswith("data.pkl"))
  if choice < 6:
    body, how = mutate_pickle(members[pkl][1], rng, ops)
    new = list(members)
    new[pkl] = (members[pkl][0], body)
    return _write_zip(new), f"data.pkl: {how}"
  if choice == 6:
    storages = [i for i, (n, _) in enumerate(members) if "/data/" in n]
    i = rng.choice(storages)
    body = members[i][1]
    body = body[:rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + b"\x00" * 8
    new = list(members)
    new[i] = (members[i][0], body)
    return _write_zip(new), f"resize {members[i][0]}"
  if choice == 7:
    name = rng.choice(members)[0]
    return _write_zip(members, deflate={name}), f"deflate {name}"
  if choice == 8:
    return data[:rng.randrange(len(data))], "truncate"
  b = bytearray(data)
  for _ in range(rng.randint(1, 8)):
    b[rng.randrange(len(b))] = rng.randrange(256)
  return bytes(b), "random bytes"


_HEADER_VALUES = [0, -1, 1, 2**31, 2**64, 1.5, "x", None, True, [], {}, [1, 2], [-1, 4],
                  [2**62, 2**62], "Infinity", [[[[1]]]]]


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
  """A safetensors file with an edited header (fields, geometry, overlaps, structure) or bytes."""
  n = struct.unpack("<Q", data[:8])[0]
  header, body = json.loads(data[8:8 + n]), data[8 + n:]
  names = [k for k in header if k != "__metadata__"]
  choice = rng.randrange(9)
  how = ""
  if choice < 4:
    name, field = rng.choice(names), rng.choice(["dtype", "shape", "data_offsets"])
    value = rng.choice(_HEADER_VALUES + ["F32", "BF16", "F64", "U8", "BOOL"])
    if field != "dtype" and isinstance(value, list) and value and rng.random() < 0.5:
      value = [v + rng.choice([-1, 1]) for v in header[name][field]] if header[name][field] \
          else value
    header[name][field] = value
    how = f"{name}.{field} = {value!r}"
  elif choice == 4:  # every entry points at the same bytes
    spec = header[rng.choice(names)]
    for i in range(rng.randint(2, 64)):
      header[f"copy{i}"] = dict(spec)
    how = "entries sharing one range"
  elif choice == 5:
    header = rng.choice([[header], 1, "x", None, {"a": {"b": {"c": [[[]]]}}}])
    how = f"header is {type(header).__name__}"
  elif choice == 6:
    text = "[" * rng.choice([100, 5000, 50000]) + "]" * 10
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + body, "deep JSON"
  elif choice == 7:
    raw = json.dumps(header).encode()
    length = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2**63, 2**64 - 1, len(data)])
    return struct.pack("<Q", length) + raw + body, f"header length {length}"
  else:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b), "random bytes"
  raw = json.dumps(header).replace('"Infinity"', "Infinity").encode()
  return struct.pack("<Q", len(raw)) + raw + body, how


def fuzz(seed_file: str, out_dir: str, seconds: float, seed: int) -> dict:
  data = open(seed_file, "rb").read()
  ext = os.path.splitext(seed_file)[1]
  rng = random.Random(seed)
  mutant, recipe = os.path.join(out_dir, "mutant" + ext), os.path.join(out_dir, "mutant.txt")
  fmt = "safetensors" if ext == ".safetensors" else ("zip" if data[:2] == b"PK" else "legacy")
  if fmt == "zip":
    members = _zip_members(data)
    ops = _pickle_ops(next(b for n, b in members if n.endswith("data.pkl")))
  elif fmt == "legacy":
    ops = _pickle_ops_all(data)
  counts, failures = {"loaded": 0, "refused": 0, "failed": 0}, []
  end = time.monotonic() + seconds
  i = 0
  while time.monotonic() < end:
    if fmt == "zip":
      body, how = mutate_zip(data, members, rng, ops)
    elif fmt == "legacy":
      body, how = mutate_pickle(data, rng, ops)
    else:
      body, how = mutate_safetensors(data, rng)
    with open(recipe, "w") as f:
      f.write(f"seed {seed} mutant {i}: {how}\n")
    with open(mutant, "wb") as f:
      f.write(body)
    fn = "load_state_dict" if fmt == "safetensors" or i % 2 else "load_torch_checkpoint"
    result = outcome(fn, mutant)
    counts[result["kind"]] += 1
    if not result["ok"] and len(failures) < 5:
      keep = os.path.join(out_dir, f"failure{len(failures)}{ext}")
      os.replace(mutant, keep)
      failures.append(dict(file=keep, recipe=how, fn=fn, detail=result["detail"]))
    i += 1
  return dict(format=fmt, mutants=i, counts=counts, failures=failures)


def _pickle_ops_all(data: bytes) -> list[tuple[int, int]]:
  """Opcode spans of every pickle at the start of a legacy file (the raw storages follow)."""
  spans, pos = [], 0
  f = io.BytesIO(data)
  for _ in range(5):  # magic, protocol, sys_info, the data, the storage keys
    f.seek(pos)
    ops = [p for _, _, p in pickletools.genops(f)]
    end = f.tell()
    spans += list(zip(ops, ops[1:] + [end]))
    pos = end
  return spans


if __name__ == "__main__":
  cap_memory()
  if sys.argv[1] == "load":
    print(json.dumps(outcome(sys.argv[2], sys.argv[3])))
  else:
    print(json.dumps(fuzz(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
