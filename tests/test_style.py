"""One style for the whole repository: ``ruff format --check`` and
``ruff check`` (configuration in pyproject.toml) over every file."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
  """The ruff next to this Python (the test extra installs it), else PATH."""
  here = os.path.join(os.path.dirname(sys.executable), "ruff")
  path = here if os.path.exists(here) else shutil.which("ruff")
  if path is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  return path


@pytest.mark.parametrize(
  "args", [["format", "--check", "."], ["check", "."]], ids=["format", "lint"]
)
def test_ruff(args):
  proc = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, (
    f"`ruff {' '.join(args)}` failed; run `ruff format . && ruff check --fix .`\n"
    + proc.stdout
    + proc.stderr
  )
