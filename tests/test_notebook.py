"""Executes examples/notebooks/quickstart.ipynb end to end (nbclient)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_runs():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  text = "\n".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "stream"
  )
  assert "test AUC" in text and "gradcraft" in text
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) >= 2  # training curves and cosine matrix


def test_notebook_is_stored_without_outputs():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for c in nb.cells:
    if c.cell_type == "code":
      assert not c.get("outputs") and c.get("execution_count") is None
