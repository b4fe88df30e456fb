"""The Python examples of the documentation run and their assertions hold.

Every fenced block whose info string is exactly ``python`` in the pages
below is executed, in order, in one namespace per page (so later blocks see
earlier definitions). Fragments that are not meant to run stand in ``py``
fences.
"""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(page: str) -> list[str]:
  return _FENCE.findall((DOCS / page).read_text(encoding="utf-8"))


def run_page(page: str) -> dict:
  blocks = python_blocks(page)
  assert blocks, f"docs/{page} has no ```python blocks"
  namespace: dict = {"__name__": f"docs_{page.replace('-', '_')[:-3]}"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"docs/{page} [python block {i + 1}]", "exec"), namespace)
  return namespace


@pytest.mark.slow  # jit of a Flax model: ~10 s on a loaded 2-core machine
def test_getting_started_runs():
  pytest.importorskip("flax")
  ns = run_page("getting-started.md")
  assert ns["losses"].shape == (2,)


@pytest.mark.parametrize("page", ["index.md", "concepts.md", "gradcraft.md", "nmt.md"])
def test_page_examples_run(page):
  if not python_blocks(page):
    pytest.skip(f"docs/{page} has no runnable examples")
  run_page(page)


def test_readme_first_block_runs_as_written():
  """The README's first code block defines every name it uses and trains:
  both task losses end below their value at the start (zero heads: the mean
  of the squared targets)."""
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  first = _FENCE.search(text)
  assert first is not None, "README.md has no ```python block"
  namespace: dict = {"__name__": "readme"}
  exec(compile(first.group(1), "README.md [first python block]", "exec"), namespace)
  losses = np.asarray(namespace["losses"])
  start = np.mean(np.asarray(namespace["batch"]["y"]) ** 2, axis=0)
  assert losses.shape == (2,) and np.all(np.isfinite(losses))
  assert np.all(losses < start), (losses, start)


def test_blocks_are_found():
  # A change of fence style must not silently turn the tests into no-ops.
  assert len(python_blocks("getting-started.md")) >= 2
