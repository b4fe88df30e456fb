"""The documentation site builds offline with ``mkdocs build --strict``.

Strict mode turns every warning into an error: broken links and anchors,
nav entries without a file (the quickstart notebook included), docstrings
that document parameters a function does not have, and so on.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "quickstart.ipynb"

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocs_jupyter")


def test_mkdocs_build_strict(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mkdocs",
      "build",
      "--strict",
      "--config-file",
      str(ROOT / "mkdocs.yml"),
      "--site-dir",
      str(tmp_path / "site"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  hint = (
    ""
    if NOTEBOOK.exists()
    else f"\n(note: {NOTEBOOK.relative_to(ROOT)} does not exist; the nav and the pages link to it)"
  )
  assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}{hint}"
  site = tmp_path / "site"
  for page in (
    "index.html",
    "getting-started/index.html",
    "api/index.html",
    "gradcraft/index.html",
    "nmt/index.html",
  ):
    assert (site / page).is_file(), page
  api = (site / "api" / "index.html").read_text(encoding="utf-8")
  assert 'id="gradcraft_jax.gradcraft.gradcraft"' in api
  assert "arithmatex" in api  # docstring math was converted for MathJax
