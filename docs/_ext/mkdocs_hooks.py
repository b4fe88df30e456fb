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
* Math is rendered offline: MathJax 3 (``tex-svg.js``, self-contained fonts,
  and the TeX extensions it loads on demand) is copied into the site from
  the ``django-static-mathjax`` package of the docs extra (it vendors the
  MathJax distribution as plain files, with no dependency), so no page
  loads a script from the network.
* The notebook page is rendered by nbconvert's template, which adds a
  loader of Mermaid from a CDN (used only for Mermaid diagrams, which the
  notebook has none of) and a MathJax 2 configuration with an empty script
  (dead code next to the site's MathJax 3); both are removed.
  ``tests/test_docs_build.py`` checks that no page of the built site loads
  anything from the network.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import shutil

from mkdocs.exceptions import PluginError
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
# ``<!-- api: PACKAGE -->`` in a page expands to one mkdocstrings block per
# name in that package's ``__all__`` (read with ``ast`` from the
# ``from module import name`` lines of its ``__init__.py``, following
# re-exports to the defining module, without importing anything), so the
# reference always covers exactly the public API. Names already on the page
# (an explicit ``::: path`` line, or an earlier marker) are skipped, so a page
# can present the core by hand and let markers list the rest.
#
# Every object is documented under its *public* name: ``gradcraft_jax.NAME``
# when the top-level package exports it, else ``PACKAGE.NAME``. The anchors
# are therefore stable (``api.md#gradcraft_jax.mgda``,
# ``api.md#gradcraft_jax.methods.mgda_weights``) whatever private module
# defines the object. The blocks are grouped by defining module, under a
# heading taken from that module's docstring (for the methods: one group per
# method, the library's own GradCraft and NMT first).


_API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)
_DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)
TOP = "gradcraft_jax"
_FIRST_GROUPS = ("gradcraft_jax.methods._gradcraft", "gradcraft_jax.methods._nmt")


def _exports(root: str, package: str) -> tuple[list[str], dict[str, str]]:
  """``(__all__, name -> module.name)`` of a package's ``__init__.py``."""
  init = os.path.join(root, *package.split("."), "__init__.py")
  single = os.path.join(root, *package.split(".")) + ".py"
  is_module = not os.path.isfile(init) and os.path.isfile(single)
  with open(single if is_module else init, encoding="utf-8") as f:
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
  if is_module:  # a plain module: its public names are defined in it
    source = {name: f"{package}.{name}" for name in names}
  return names, source


def _imports(root: str, module: str) -> dict[str, str] | None:
  """``name -> module.name`` for the ``from module import name`` lines of a
  package's ``__init__.py``; None if ``module`` is not a package."""
  init = os.path.join(root, *module.split("."), "__init__.py")
  if not os.path.isfile(init):
    return None
  return _exports(root, module)[1]


def _defining_path(root: str, path: str) -> str:
  """Follows re-exports through packages' ``__init__.py`` to the module that
  defines the name (``gradcraft_jax.mgda`` -> ``...methods._mgda.mgda``)."""
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
  return doc.strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")


def _title(summary: str, module: str) -> str:
  """A short heading from a module summary: the text before its first
  ``": "`` or ``" ("``, e.g. "MGDA" or "Dynamic Weight Average"."""
  title = summary.rstrip(".")
  for sep in (": ", " ("):
    title = title.split(sep)[0]
  return title or module


def _order(module: str, path: str, index: int) -> tuple:
  name = path.rsplit(".", 1)[1]
  is_factory = name == module.rsplit(".", 1)[1].lstrip("_")
  is_state = name.endswith("State")
  return (not is_factory, is_state, index)


def _api_markdown(root: str, package: str, seen: set[str]) -> str:
  names, source = _exports(root, package)
  top_names, top_source = _exports(root, TOP)
  groups: dict[str, list[tuple[str, int]]] = {}
  for index, name in enumerate(names):
    path = source.get(name)
    if path is None:
      log.warning(
        "%s.__all__ lists %r but no 'from ... import %s' line defines it", package, name, name
      )
      continue
    target = os.path.join(root, *path.split("."))
    if os.path.isdir(target) or os.path.isfile(target + ".py"):
      continue  # a submodule (``from package import module``): documented on its own
    defining = _defining_path(root, path)
    if defining in seen:
      continue
    seen.add(defining)
    top = name in top_names and name in top_source
    public = f"{TOP}.{name}" if top and _defining_path(root, top_source[name]) == defining else None
    groups.setdefault(defining.rsplit(".", 1)[0], []).append((public or f"{package}.{name}", index))
  modules = sorted(
    groups,
    key=lambda m: (m not in _FIRST_GROUPS, _FIRST_GROUPS.index(m) if m in _FIRST_GROUPS else 0, m),
  )
  if package == TOP:
    modules = list(groups)  # the order of __all__
  out = []
  for module in modules:
    summary = _module_summary(root, module)
    out.append(f"### {_title(summary, module)}\n")
    if summary:
      out.append(summary + "\n")
    items = sorted(groups[module], key=lambda pi: _order(module, pi[0], pi[1]))
    for public, _ in items:
      out.append(f"::: {public}\n    options:\n      heading_level: 4\n")
  return "\n".join(out)


def _expand_api(markdown: str, config) -> str:
  root = os.path.dirname(config.config_file_path)
  seen = {_defining_path(root, p) for p in _DIRECTIVE.findall(markdown)}
  return _API.sub(lambda m: _api_markdown(root, m.group(1), seen), markdown)


# --- offline math ------------------------------------------------------------
# The site path of the MathJax build; mkdocs.yml's extra_javascript lists it.
MATHJAX_SITE_DIR = "javascripts/mathjax"
MATHJAX_SCRIPT = "tex-svg.js"


def _mathjax_es5() -> str:
  """The ``es5`` folder of the MathJax 3 distribution vendored by the
  ``django-static-mathjax`` package (top-level package ``mathjax``)."""
  spec = importlib.util.find_spec("mathjax")
  for base in list(spec.submodule_search_locations or []) if spec else []:
    es5 = os.path.join(base, "static", "mathjax", "es5")
    if os.path.isfile(os.path.join(es5, MATHJAX_SCRIPT)):
      return es5
  raise PluginError(
    "MathJax is not installed: the docs serve it from the django-static-mathjax "
    "package (pip install -e '.[docs]'), so that math renders offline"
  )


def on_post_build(config):
  es5 = _mathjax_es5()
  dest = os.path.join(config.site_dir, *MATHJAX_SITE_DIR.split("/"))
  os.makedirs(dest, exist_ok=True)
  shutil.copy2(os.path.join(es5, MATHJAX_SCRIPT), os.path.join(dest, MATHJAX_SCRIPT))
  # TeX packages that tex-svg.js autoloads (e.g. \boldsymbol, \cancel),
  # fetched relative to the script.
  ext = os.path.join("input", "tex", "extensions")
  shutil.copytree(os.path.join(es5, ext), os.path.join(dest, ext), dirs_exist_ok=True)


# --- nothing from the network --------------------------------------------------
_NBCONVERT_NETWORK = (
  # nbconvert's Mermaid loader: a module script importing from cdnjs.
  re.compile(
    r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*?</script>", re.S
  ),
  # nbconvert's MathJax 2 block: an empty <script src=""> and its config.
  re.compile(r"<!-- Load mathjax -->\s*<script src=\"\">\s*</script>", re.S),
  re.compile(
    r"<!-- MathJax configuration -->\s*<script type=\"text/x-mathjax-config\">.*?</script>", re.S
  ),
)


def on_post_page(output, page, config):
  del config
  if page.file.src_uri.endswith(".ipynb"):
    for pattern in _NBCONVERT_NETWORK:
      output = pattern.sub("", output)
  return output
