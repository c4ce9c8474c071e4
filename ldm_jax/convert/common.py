"""Strict, template-driven assignment of torch state-dict tensors to Flax parameter trees.

Every importer in `ldm_jax.convert` works the same way: build the Flax parameter *template* with
`jax.eval_shape(module.init, ...)` (nothing allocated), then, for every leaf of the template, name
the torch key it comes from and how to transform it. `strict_load` walks the template, so a weight
can never be skipped silently: it collects every missing key, every unexpected key and every shape
mismatch and raises one `WeightLoadError` listing them all.
"""

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

# Defined with the package's other errors (ldm_jax/errors.py); importers use it from here.
from ldm_jax.errors import WeightLoadError  # pylint: disable=unused-import

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch conv weight [O, I, kh, kw] -> Flax [kh, kw, I, O]."""
  return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
  """torch linear [out, in] (or 1x1 conv [out, in, 1, 1], conv1d [out, in, 1]) -> Flax [in, out]."""
  w = w.reshape(w.shape[0], w.shape[1]) if w.ndim > 2 else w
  return np.transpose(w, (1, 0))


def identity(w: np.ndarray) -> np.ndarray:
  return w


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def summarise(title: str, items: list[str], limit: int = 20) -> str:
  """An indented, titled list of at most `limit` items, for multi-line load errors."""
  shown = "\n    ".join(items[:limit])
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n    {shown}{more}"


def strict_load(template: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                key_fn: Callable[[Path], tuple[str, Transform]], *, what: str,
                ignore: Iterable[str] = (), ignore_prefixes: Iterable[str] = ()) -> dict[str, Any]:
  """Builds a parameter tree shaped like `template` from `state_dict`, or raises.

  Args:
    template: nested dict whose leaves have `.shape` and `.dtype` (e.g. from `jax.eval_shape`).
    state_dict: flat torch-style {key: array}, arrays already numpy.
    key_fn: maps a template path to (torch key, transform). Several paths may read one key.
      Transforms only re-view their input (transpose, reshape, slice): a tensor is copied once,
      here, after its key and shape matched the template, so a tensor the model does not need or
      cannot take (e.g. a 2^30-element zero-stride view from a hostile file) is never copied.
    what: the model's name, used in the error message.
    ignore / ignore_prefixes: torch keys that are allowed to be left over (buffers such as
      `position_ids`).
  Returns:
    A nested dict of C-contiguous numpy arrays with the template's shapes and dtypes (a
    transposed view would be re-laid-out by every host-to-device transfer, on every call that
    passes the parameters as host arrays).
  Raises:
    WeightLoadError listing missing keys, unexpected keys and shape mismatches.
  """
  ignore = set(ignore)
  ignore_prefixes = tuple(ignore_prefixes)
  flat_template = flatten(jax.tree_util.tree_map(lambda x: x, dict(template)))
  used: set[str] = set()
  missing, mismatched, out = [], [], {}
  for path, leaf in flat_template.items():
    key, transform = key_fn(path)
    if key not in state_dict:
      missing.append(f"{key}  (for {'/'.join(path)}, shape {tuple(leaf.shape)})")
      continue
    used.add(key)
    value = transform(np.asarray(state_dict[key]))
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> "
                        f"{tuple(value.shape)}, model {'/'.join(path)} expects {tuple(leaf.shape)}")
      continue
    out[path] = np.array(value, dtype=leaf.dtype, order="C")  # always a copy, never a view
  unexpected = sorted(k for k in state_dict
                      if k not in used and k not in ignore and not k.startswith(ignore_prefixes))
  if missing or unexpected or mismatched:
    parts = [f"{what}: the checkpoint does not match the model "
             f"({len(flat_template)} parameters expected, {len(state_dict)} tensors given)."]
    if missing:
      parts.append(summarise("missing keys", missing))
    if unexpected:
      parts.append(summarise("unexpected keys", unexpected))
    if mismatched:
      parts.append(summarise("shape mismatches", mismatched))
    raise WeightLoadError("\n".join(parts))
  return unflatten(out)


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The sub-dict of keys starting with `prefix`, with the prefix removed."""
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
