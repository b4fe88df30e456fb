"""The short examples in ``examples/``: each teaches one thing in under
about 150 lines, and the quickstart trains (both task losses go down)."""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_examples_are_short(path):
  lines = path.read_text(encoding="utf-8").count("\n")
  assert lines <= 150, f"{path.name} has {lines} lines: keep examples short (benchmarks/ for more)"


def test_quickstart_trains():
  spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  first, last = quickstart.main(steps=60)
  assert np.all(np.isfinite(last)) and np.all(np.asarray(last) < np.asarray(first))


def test_recsys_ranking_trains():
  """The ranking example (MMoE, embedding tables, lean GradCraft step):
  every task's held-out loss goes down, at small sizes."""
  spec = importlib.util.spec_from_file_location("recsys_ranking", EXAMPLES / "recsys_ranking.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  first, last = example.main(steps=60, vocab=1_000, tasks=3, batch_size=256)
  assert np.all(np.isfinite(last)) and np.all(np.asarray(last) < np.asarray(first))
