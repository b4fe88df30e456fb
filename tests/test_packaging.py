"""Packaging: the install commands of the README, the docs and the notebook
use the repository address of ``pyproject.toml``; the built sdist and wheel
hold the data's licence, ``py.typed`` and (where built) the CPU kernel."""

import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

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


def test_one_version_everywhere():
  """``pyproject.toml``, ``gradcraft_jax.__version__`` and the newest
  CHANGELOG entry name the same version."""
  import gradcraft_jax

  text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
  version = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE).group(1)
  assert gradcraft_jax.__version__ == version
  changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  assert re.search(r"^## \[([^\]]+)\]", changelog, re.MULTILINE).group(1) == version


# ------------------------------------------------------------ sdist and wheel
_SOURCES = (
  "pyproject.toml",
  "setup.py",
  "MANIFEST.in",
  "README.md",
  "LICENSE",
  "csrc",
  "gradcraft_jax",
)


def _copy_sources(dest: pathlib.Path) -> None:
  """The files a build reads, without build outputs (the in-place kernel,
  caches), so that the build neither reads nor writes the checkout's."""
  ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
  for name in _SOURCES:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=ignore)
    else:
      shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_sdist_and_wheel_build_and_install(tmp_path):
  """``python -m build`` (offline: ``--no-isolation``, this environment's
  setuptools and jaxlib) gives an sdist and, built from it, a wheel; both
  hold the data's licence and attribution and ``py.typed``; the wheel holds
  the compiled kernel where a C++ compiler exists, and installed on its own
  (``pip install --target``) it imports, reads its bundled data and reports
  the kernel's state."""
  pytest.importorskip("build")
  src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
  src.mkdir()
  _copy_sources(src)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("GRADCRAFT_JAX_BUILD_KERNEL", None)
  env.pop("GRADCRAFT_JAX_CPU_KERNEL", None)
  proc = subprocess.run(
    [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (sdist,) = dist.glob("gradcraft_jax-*.tar.gz")
  (wheel,) = dist.glob("gradcraft_jax-*.whl")

  with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  for name in (
    "LICENSE",
    "csrc/gram_cpu.cc",
    "gradcraft_jax/py.typed",
    "gradcraft_jax/data/census_income.npz",
    "gradcraft_jax/data/LICENSE-census-income.txt",
    "gradcraft_jax/data/README.md",
  ):
    assert name in names, f"{name} missing from {sdist.name}"

  with zipfile.ZipFile(wheel) as whl:
    names = set(whl.namelist())
    metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  for name in (
    "gradcraft_jax/py.typed",
    "gradcraft_jax/data/census_income.npz",
    "gradcraft_jax/data/LICENSE-census-income.txt",
  ):
    assert name in names, f"{name} missing from {wheel.name}"
  licences = {n.split(".dist-info/licenses/", 1)[1] for n in names if ".dist-info/licenses/" in n}
  assert licences == {"LICENSE", "gradcraft_jax/data/LICENSE-census-income.txt"}
  assert "License-Expression: Apache-2.0 AND CC-BY-4.0" in metadata
  kernels = [n for n in names if n.startswith("gradcraft_jax/_gram_cpu") and n.endswith(".so")]
  compiler = shutil.which("c++") or shutil.which("g++")
  if compiler and platform.system() == "Linux" and platform.machine() == "x86_64":
    assert kernels, f"no compiled kernel in {wheel.name} although {compiler} exists"

  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  code = (
    "import importlib.resources, gradcraft_jax as gj\n"
    f"assert gj.__file__.startswith({str(site)!r}), gj.__file__\n"
    "from gradcraft_jax.datasets import load_census_income\n"
    "data = load_census_income(max_rows=300)\n"
    "text = importlib.resources.files('gradcraft_jax').joinpath(\n"
    "  'data/LICENSE-census-income.txt').read_text()\n"
    "assert 'CC BY 4.0' in text\n"
    "print(gj.kernel_info().enabled)\n"
    "print(gj.kernel_info())\n"
  )
  env["PYTHONPATH"] = str(site)
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  enabled, line = proc.stdout.splitlines()[-2:]
  assert enabled == str(bool(kernels)), line
  assert line.startswith("CPU kernel on: built against jaxlib" if kernels else "CPU kernel off: ")
