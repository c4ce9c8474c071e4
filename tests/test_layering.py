"""The package's floors: what may import what, and no import cycles (docs/architecture.md).

Every module of `ldm_jax` is parsed with `ast`; every import of an `ldm_jax` module counts,
function-local ones included, so a local import cannot hide an upward edge or a cycle. A module may
import modules of its own floor or of floors below it, never above; the command lines (cli/, aot/,
`python -m` entry points) are the top floor and nothing imports them.

The package walked is the `ldm_jax` this test imports; LDM_JAX_LAYERING_DIR=/path/to/ldm_jax walks
another checkout's (e.g. to show that a branch without these floors fails).
"""

import ast
import os
import pathlib

import pytest

import ldm_jax

PACKAGE_DIR = pathlib.Path(os.environ.get("LDM_JAX_LAYERING_DIR") or
                           pathlib.Path(ldm_jax.__file__).parent)

# Bottom to top. A name matches itself and, except the root package, every module below it; the
# longest match wins (eval/ is a building block, eval/sample_eval.py and paired_eval.py sample a
# model).
FLOORS = (
    ("foundation", ("ldm_jax.errors", "ldm_jax.workdir_layout", "ldm_jax.xla_cpu",
                    "ldm_jax.compile_cache", "ldm_jax.parallel", "ldm_jax.family")),
    ("building blocks", ("ldm_jax.kernels", "ldm_jax.diffusion", "ldm_jax.models",
                         "ldm_jax.data", "ldm_jax.convert", "ldm_jax.eval")),
    ("networks", ("ldm_jax.networks",)),
    ("model services", ("ldm_jax.model_io", "ldm_jax.sampling")),
    ("model", ("ldm_jax", "ldm_jax.ldm", "ldm_jax.eval.sample_eval", "ldm_jax.eval.paired_eval")),
    # validate checks whole experiment configs, training fields included.
    ("training", ("ldm_jax.train", "ldm_jax.validate", "ldm_jax.sweep")),
    ("command lines", ("ldm_jax.cli", "ldm_jax.aot", "ldm_jax.convert.__main__",
                       "ldm_jax.evaluate_shapes")),
)
ROOT = "ldm_jax"
# Inside the building blocks: the networks, the diffusion math and the data pipeline know nothing of
# each other beyond this (weight import, convert/, and the metrics, eval/, may use all of them).
BLOCKS_MAY_IMPORT = {
    "ldm_jax.kernels": (),
    "ldm_jax.diffusion": ("ldm_jax.kernels",),
    "ldm_jax.models": ("ldm_jax.kernels",),
    "ldm_jax.data": (),
}

# Known edges that break the rules, each with who removes it. Nothing else may be added here.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str, known) -> str | None:
  """The known module `name` refers to: itself, or its longest known prefix (an attribute)."""
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(name: str, path: pathlib.Path, known) -> set[str]:
  """The ldm_jax modules `name` imports anywhere in its file (module level or in functions)."""
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  is_package = path.name == "__init__.py"
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: from the module's package upwards.
        package = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
          package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
      # `from pkg import sub` imports the submodule; `from mod import name` the module.
      targets = [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for target in targets:
      if target == ROOT or target.startswith(ROOT + "."):
        resolved = _resolve(target, known)
        if resolved and resolved != name:
          out.add(resolved)
  return out


def import_graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports_of(name, path, known) for name, path in known.items()}


def floor_of(name: str) -> int | None:
  best = None
  for index, (_, prefixes) in enumerate(FLOORS):
    for prefix in prefixes:
      matches = name == prefix or (prefix != ROOT and name.startswith(prefix + "."))
      if matches and (best is None or len(prefix) > best[0]):
        best = (len(prefix), index)
  return None if best is None else best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_the_walk_sees_local_and_relative_imports(graph):
  # Fixed points of the walk itself: a module-level import and a function-local one.
  assert "ldm_jax.models.build" in graph["ldm_jax.ldm"]
  assert "ldm_jax.diffusion.tiling" in graph["ldm_jax.ldm"]  # Inside a function.
  assert len(graph) > 50


def test_every_module_has_a_floor(graph):
  homeless = sorted(name for name in graph if floor_of(name) is None)
  assert not homeless, (f"modules on no floor (add them to FLOORS and docs/architecture.md): "
                        f"{homeless}")


def test_imports_point_down(graph):
  upward = []
  for name, targets in sorted(graph.items()):
    for target in sorted(targets):
      if (name, target) in ALLOWED:
        continue
      if floor_of(target) is not None and floor_of(name) is not None and (
          floor_of(target) > floor_of(name)):
        upward.append(f"{name} ({FLOORS[floor_of(name)][0]}) imports {target} "
                      f"({FLOORS[floor_of(target)][0]})")
  assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_library_never_imports_command_lines_or_training(graph):
  top = len(FLOORS) - 1
  training = [i for i, (label, _) in enumerate(FLOORS) if label == "training"][0]
  bad = [f"{name} imports {target}" for name, targets in sorted(graph.items())
         for target in sorted(targets)
         if (floor_of(target) == top and floor_of(name) != top)
         or (target.startswith("ldm_jax.train") and floor_of(name) < training)]
  assert not bad, "\n".join(bad)


def test_building_blocks_stay_apart(graph):
  bad = []
  for name, targets in sorted(graph.items()):
    package = ".".join(name.split(".")[:2])
    if package not in BLOCKS_MAY_IMPORT:
      continue
    for target in sorted(targets):
      other = ".".join(target.split(".")[:2])
      if (floor_of(target) == floor_of(name) and other != package
          and other not in BLOCKS_MAY_IMPORT[package]):
        bad.append(f"{name} imports {target}")
  assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
  pruned = {name: {t for t in targets if (name, t) not in ALLOWED}
            for name, targets in graph.items()}
  found = cycles(pruned)
  assert not found, "import cycles (function-local imports included):\n" + "\n".join(
      " <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
  # The checker itself can fail: a three-module ring and a self-contained pair.
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_allowed_exceptions_still_exist(graph):
  # An exception that no longer happens must leave the list, so it cannot hide a new one.
  stale = sorted(edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], ()))
  assert not stale, f"remove these from ALLOWED, the imports are gone: {stale}"
