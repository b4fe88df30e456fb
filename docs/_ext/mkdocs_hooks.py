"""MkDocs hooks of the docs build (``hooks:`` in mkdocs.yml).

* The quickstart notebook lives in ``examples/notebooks/`` (outside
  ``docs/``); it is added to the site as ``notebooks/quickstart.ipynb`` and
  rendered by mkdocs-jupyter (not executed). If it is missing, the nav entry
  points nowhere and ``mkdocs build --strict`` fails, on purpose.
* Benchmark results in ``docs/benchmarks/`` are written by the benchmark
  scripts. In the Markdown of the pages, a snippet include
  (``--8<-- "benchmarks/x.md"``) or an image (``![...](benchmarks/x.png)``)
  whose file does not exist yet is replaced by a visible "not yet generated"
  note, so the strict build passes before the benchmarks have been run and
  nothing is invented.
"""

from __future__ import annotations

import ast
import logging
import os
import re

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.gradcraft_jax")

# site path -> (source folder relative to the repository root): the notebook
# examples/notebooks/quickstart.ipynb appears as notebooks/quickstart.ipynb.
_NOTEBOOKS = {"notebooks/quickstart.ipynb": "examples"}
_SNIPPET = re.compile(r'^(\s*)--8<--\s+"([^"]+)"\s*$', re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\((benchmarks/[^)\s]+)\)")


@event_priority(100)  # before mkdocs-jupyter wraps .ipynb files
def on_files(files, config):
  root = os.path.dirname(config.config_file_path)
  for uri, folder in _NOTEBOOKS.items():
    src_dir = os.path.join(root, folder)
    if os.path.isfile(os.path.join(src_dir, uri)):
      # A real File (not File.generated) so that mkdocs-jupyter's wrapper
      # sees its abs_src_path.
      files.append(
        File(
          uri,
          src_dir=src_dir,
          dest_dir=config.site_dir,
          use_directory_urls=config.use_directory_urls,
        )
      )
    else:
      log.info("notebook %s/%s not found", folder, uri)
  return files


def _missing_note(what: str) -> str:
  return (
    f'!!! warning "Not yet generated"\n    `{what}` does not exist yet: '
    "run the benchmark command of this section to produce it.\n"
  )


def on_page_markdown(markdown, page, config, files):
  docs = config.docs_dir

  def snippet(m):
    indent, path = m.group(1), m.group(2)
    if os.path.isfile(os.path.join(docs, path)):
      return m.group(0)
    return "\n".join(indent + l for l in _missing_note("docs/" + path).splitlines())

  def image(m):
    path = os.path.normpath(os.path.join(os.path.dirname(page.file.src_path), m.group(2)))
    if os.path.isfile(os.path.join(docs, path)):
      return m.group(0)
    return f"*(figure `docs/{path}` not yet generated)*"

  markdown = _SNIPPET.sub(snippet, markdown)
  markdown = _IMAGE.sub(image, markdown)
  return _expand_api(markdown, config)


# --- API reference -----------------------------------------------------------
# ``<!-- api: gradcraft_jax -->`` in a page expands to one mkdocstrings block
# per name in that package's ``__all__``, grouped by the module that defines
# it (read from the ``from module import name`` lines of its ``__init__.py``
# with ``ast``, without importing anything, following re-exports), so the
# reference always covers exactly the public API. A name already rendered by
# an earlier marker on the page is skipped.


_API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)


def _public_api(root: str, package: str) -> list[tuple[str, list[str]]]:
  init = os.path.join(root, *package.split("."), "__init__.py")
  with open(init, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names: list[str] = []
  source: dict[str, str] = {}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        source[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
    ):
      names = list(ast.literal_eval(node.value))
  groups: dict[str, list[str]] = {}
  for name in names:
    path = source.get(name)
    if path is not None:
      path = _defining_path(root, path)
    if path is None:
      log.warning(
        "%s.__all__ lists %r but no 'from ... import %s' line defines it", package, name, name
      )
      path = f"{package}.{name}"
    groups.setdefault(path.rsplit(".", 1)[0], []).append(path)
  return list(groups.items())


def _imports(root: str, module: str) -> dict[str, str] | None:
  """``name -> module.name`` for the ``from module import name`` lines of a
  package's ``__init__.py``; None if ``module`` is not a package."""
  init = os.path.join(root, *module.split("."), "__init__.py")
  if not os.path.isfile(init):
    return None
  with open(init, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = {}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  return out


def _defining_path(root: str, path: str) -> str:
  """Follows re-exports through packages' ``__init__.py`` to the module that
  defines the name (``gradcraft_jax.methods.dwa`` -> ``...methods.dwa.dwa``:
  in a package, a function may share its name with a submodule)."""
  for _ in range(10):
    module, name = path.rsplit(".", 1)
    imports = _imports(root, module)
    if imports is None or name not in imports:
      return path
    path = imports[name]
  return path


def _module_summary(root: str, module: str) -> str:
  base = os.path.join(root, *module.split("."))
  path = base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")
  try:
    with open(path, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except OSError:
    return ""
  return doc.strip().split("\n\n")[0].replace("\n", " ")


def _api_markdown(root: str, package: str, seen: set[str]) -> str:
  out = []
  for module, paths in _public_api(root, package):
    paths = [p for p in paths if p not in seen]  # listed by an earlier marker
    seen.update(paths)
    if not paths:
      continue
    out.append(f"## `{module}`\n")
    summary = _module_summary(root, module)
    if summary:
      out.append(summary.replace("``", "`") + "\n")
    for path in paths:
      out.append(f"::: {path}\n")
  return "\n".join(out)


def _expand_api(markdown: str, config) -> str:
  root = os.path.dirname(config.config_file_path)
  seen: set[str] = set()
  return _API.sub(lambda m: _api_markdown(root, m.group(1), seen), markdown)
