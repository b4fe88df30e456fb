"""The package type-checks: ``python -m mypy gradcraft_jax`` with the
``[tool.mypy]`` configuration of pyproject.toml (the package ships
``py.typed``, so its annotations are what users' type checkers read)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mypy(tmp_path):
  pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]' installs it)")
  cmd = [
    sys.executable,
    "-m",
    "mypy",
    "--config-file",
    "pyproject.toml",
    "--cache-dir",
    str(tmp_path / "mypy_cache"),  # a fresh check, nothing written into the repository
    "gradcraft_jax",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, (
    "`python -m mypy gradcraft_jax` failed:\n" + proc.stdout + proc.stderr
  )
  assert "Success" in proc.stdout, proc.stdout
