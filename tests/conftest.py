import os
import re
import sys

import pytest
from hypothesis import settings

# The NumPy references live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw the same examples on every run (CI must not flake);
# set HYPOTHESIS_PROFILE=explore to search with fresh random examples.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


# ------------------------------------------------------- scheduling (xdist)
# The suite runs with ``-n auto --dist loadgroup`` (pyproject.toml). Two
# things keep its wall time down on a 2-core machine:
# * the tests that run a long subprocess (benchmark smoke runs, the sharded
#   checks on 8 simulated devices, the notebook, the docs and wheel builds)
#   start first, so the workers do not finish on one of them while the other
#   is idle;
# * the compatibility matrix and the method property tests share compiled
#   steps per method (``functools.lru_cache`` in the modules): their tests are
#   grouped per method, so one worker compiles each method's steps once.
_RUN_FIRST = (
  "test_sharding.py",
  "test_census_benchmark.py::test_quick_",
  "test_movielens_benchmark.py::test_quick_run",
  "test_conflict_study.py::test_quick_run",
  "test_benchmarks_smoke.py",
  "test_notebook.py",
  "test_sharded_example.py",
  "test_docs_build.py",
  "test_packaging.py::test_sdist_and_wheel",
)
_GROUPED = {
  "test_compat_matrix": "name",
  "test_method_properties": "case",
  # one compiled function per model and dtype serves all of its routes, and
  # the float32 checks read the float64 run
  "test_corpus": "model",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker("torchjd") is not None:
      item.add_marker(pytest.mark.extras)
    module = getattr(getattr(item, "module", None), "__name__", "")
    param = _GROUPED.get(module)
    callspec = getattr(item, "callspec", None)
    if param and callspec is not None and param in callspec.params:
      value = callspec.params[param]
      item.add_marker(pytest.mark.xdist_group(f"{module}-{getattr(value, 'name', value)}"))
  items.sort(key=lambda item: not any(key in item.nodeid for key in _RUN_FIRST))


# ------------------------------------------------- optional packages (extras)
# The README's test command installs only the ``test`` extra; tests that need
# anything else (torch, torchjd, the QP solvers, the docs toolchain) call
# ``pytest.importorskip`` and carry the ``extras`` marker (``torchjd`` implies
# it), so that a second run, ``pytest -m extras`` with those packages
# installed, runs exactly the tests the first run skipped (``.ci/run``).
# Two checks keep this true:
# * a test that skips because an import failed but is not marked ``extras``
#   fails instead (the second run would never select it);
# * with ``GRADCRAFT_JAX_REQUIRE_EXTRAS=1`` (the second run), a test marked
#   ``extras`` that skips because an import failed fails instead (its
#   package was meant to be installed).
_IMPORT_SKIP = re.compile(r"could not import '([^']+)'")


def _import_skip(report):
  if not report.skipped or not isinstance(report.longrepr, tuple):
    return None
  match = _IMPORT_SKIP.search(str(report.longrepr[2]))
  return match.group(1) if match else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  outcome = yield
  report = outcome.get_result()
  module = _import_skip(report)
  if module is None:
    return
  marked = item.get_closest_marker("extras") is not None
  if not marked:
    report.outcome = "failed"
    report.longrepr = (
      f"{item.nodeid} skipped because '{module}' is not installed but is not marked "
      "@pytest.mark.extras: mark it, so that `pytest -m extras` runs it where the "
      "optional packages are installed."
    )
  elif os.environ.get("GRADCRAFT_JAX_REQUIRE_EXTRAS") == "1":
    report.outcome = "failed"
    report.longrepr = (
      f"{item.nodeid} needs '{module}', which GRADCRAFT_JAX_REQUIRE_EXTRAS=1 says is "
      "installed: install the optional packages (see .ci/run)."
    )


# ------------------------------------------------ compiled-code memory maps
# Every executable XLA compiles for the CPU holds a few memory mappings of
# machine code (hundreds for a large model step), and a test process keeps
# them while its jitted functions are cached. A worker that runs a few
# thousand tests can reach the kernel's limit on mappings per process
# (``vm.max_map_count``, 65530 by default), after which the next compilation
# aborts or segfaults inside XLA. Every few tests the worker counts its
# mappings and, past a threshold well below the limit, drops JAX's compiled
# executables (``jax.clear_caches``): cached functions recompile on their
# next call.
_MAPS = "/proc/self/maps"
_MAPS_CHECK_EVERY = 8
_MAPS_THRESHOLD = 30_000
_tests_since_check = [0]


def _memory_maps():
  try:
    with open(_MAPS, "rb") as f:
      return f.read().count(b"\n")
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
  yield
  _tests_since_check[0] += 1
  if _tests_since_check[0] < _MAPS_CHECK_EVERY:
    return
  _tests_since_check[0] = 0
  if _memory_maps() > _MAPS_THRESHOLD:
    import gc  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel

    jax.clear_caches()
    gc.collect()
