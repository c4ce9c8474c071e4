"""Test helper: a benchmark script of benchmarks/ loaded as a module, by path.

    fidelity = load_benchmark("conditioning_fidelity")

Loaded under its own name (`benchmarks.<name>` would need a package), without putting benchmarks/
on sys.path here: the scripts add it themselves when they need their siblings.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
