"""Importing the package: every module imports under ``python -W error``
(below), and ``import gradcraft_jax`` does not load the data sets.

The modules are imported in a fresh interpreter with an empty bytecode cache
(``PYTHONPYCACHEPREFIX``), so that compile-time warnings (invalid escape
sequences in docstrings, for instance) are raised as well as import-time
ones.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradcraft_jax"

_SCRIPT = """
import importlib, sys
for name in sys.argv[1:]:
  importlib.import_module(name)
"""


def _modules():
  """Every Python module of the package (the compiled kernel is a plain
  shared library, loaded with ctypes: not a module)."""
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names


def test_every_module_imports_under_warnings_as_errors(tmp_path):
  env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, "-W", "error", "-c", _SCRIPT, *_modules()],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_module_list_is_complete():
  names = _modules()
  assert "gradcraft_jax" in names and "gradcraft_jax.methods._excess_mtl" in names
  assert len(names) == len(list(PACKAGE.rglob("*.py")))


def test_import_loads_no_data_module():
  """``import gradcraft_jax`` leaves the data sets to ``import
  gradcraft_jax.datasets`` (or ``from gradcraft_jax.datasets import ...``)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  script = (
    "import sys, gradcraft_jax\n"
    "assert 'gradcraft_jax.datasets' not in sys.modules, 'datasets imported'\n"
    "from gradcraft_jax.datasets import load_census_income\n"
    "import gradcraft_jax.datasets as d\n"
    "assert d.load_census_income is load_census_income\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
