"""Packaging: the install commands of the README, the docs and the notebook
use the repository address of ``pyproject.toml``; the built sdist and wheel
hold the data's licence, ``py.typed`` and (where built) the CPU kernel."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def repository_url() -> str:
  text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
  match = re.search(r'^Repository = "([^"]+)"$', text, re.MULTILINE)
  assert match, "pyproject.toml has no [project.urls] Repository"
  return match.group(1)


_GIT_INSTALL = re.compile(r"gradcraft-jax(\[[\w,]+\])? @ git\+(\S+?)[\"'\s]")


def test_install_commands_use_the_repository_url():
  url = repository_url()
  notebook = json.loads(
    (ROOT / "examples" / "notebooks" / "quickstart.ipynb").read_text(encoding="utf-8")
  )
  install_cell = "".join(notebook["cells"][1]["source"])
  assert f'REPOSITORY = "{url}"' in install_cell
  assert 'f"gradcraft-jax[examples] @ git+{REPOSITORY}"' in install_cell
  for page in ("README.md", "docs/index.md", "docs/getting-started.md"):
    text = (ROOT / page).read_text(encoding="utf-8")
    found = _GIT_INSTALL.findall(text)
    assert found, f'{page} has no `pip install "gradcraft-jax @ git+..."` line'
    assert {u for _, u in found} == {url}, f"{page}: {found} (pyproject.toml: {url})"
  # The README says how to install before its first example.
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert readme.index("git+" + url) < readme.index("```python")
