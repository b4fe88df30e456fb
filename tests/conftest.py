import os
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
#   checks on 8 simulated devices, the notebook, the docs build) start first,
#   so the workers do not finish on one of them while the other is idle;
# * the compatibility matrix and the method property tests share compiled
#   steps per method (``functools.lru_cache`` in the modules): their tests are
#   grouped per method, so one worker compiles each method's steps once.
_RUN_FIRST = (
  "test_sharding.py",
  "test_census_benchmark.py::test_quick_run",
  "test_conflict_study.py::test_quick_run",
  "test_benchmarks_smoke.py",
  "test_notebook.py",
  "test_sharded_example.py",
  "test_docs_build.py",
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
    module = getattr(getattr(item, "module", None), "__name__", "")
    param = _GROUPED.get(module)
    callspec = getattr(item, "callspec", None)
    if param and callspec is not None and param in callspec.params:
      value = callspec.params[param]
      item.add_marker(pytest.mark.xdist_group(f"{module}-{getattr(value, 'name', value)}"))
  items.sort(key=lambda item: not any(key in item.nodeid for key in _RUN_FIRST))
