"""Every public function and class documents itself with a runnable example,
and every method factory cites the paper it implements (optax's style).

Public: the names in ``__all__`` of the modules of ``tests/test_public_api.py``,
except modules, constants and the records declared with ``typing.NamedTuple``
(method states, ``GradientStats``, ``StageHistory``, ...). Each docstring needs
an ``Examples:`` section whose first line is a ``>>>`` line; the examples run
as doctests (``--doctest-modules`` on the package). Each method factory (a
name at the top level, defined in ``gradcraft_jax.methods``, that returns a
``Method`` or ``CoordinatewiseMethod``) needs a ``References:`` section with at
least one entry and its year.
"""

import importlib
import importlib.util
import inspect
import pathlib
import re
import typing

import pytest

import gradcraft_jax as gj

MODULES = (
  "gradcraft_jax",
  "gradcraft_jax.methods",
  "gradcraft_jax.diagnostics",
  "gradcraft_jax.stages",
  "gradcraft_jax.wrappers",
  "gradcraft_jax.weighting",
  "gradcraft_jax.datasets",
)

# Docstrings whose doctest is not under an ``Examples:`` heading: for these
# only the ``>>>`` lines are required. The list may only shrink
# (test_bare_doctests_list_is_current).
BARE_DOCTESTS = frozenset()


def _is_record(obj) -> bool:
  """A class declared with ``typing.NamedTuple`` (a state or result record)."""
  return inspect.isclass(obj) and obj.__bases__ == (tuple,) and hasattr(obj, "_fields")


def _public() -> dict[str, object]:
  found = {}
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj) or _is_record(obj):
        continue
      if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        continue  # constants (TASK_NAMES)
      found.setdefault(name, obj)
  return found


PUBLIC = _public()


def _factories() -> list[str]:
  names = []
  for name in gj.__all__:
    obj = getattr(gj, name)
    if not inspect.isfunction(obj) or not obj.__module__.startswith("gradcraft_jax.methods"):
      continue
    returns = typing.get_type_hints(obj).get("return")
    if returns in (gj.Method, gj.CoordinatewiseMethod):
      names.append(name)
  return names


FACTORIES = _factories()


def _section(doc: str, heading: str) -> list[str] | None:
  """The lines of a Google-style section (``heading`` alone on a line), up
  to the next line indented as the heading or less; ``None`` if absent."""
  lines = doc.splitlines()
  for i, line in enumerate(lines):
    if line.strip() == heading:
      indent = len(line) - len(line.lstrip())
      body = []
      for following in lines[i + 1 :]:
        if following.strip() and len(following) - len(following.lstrip()) <= indent:
          break
        body.append(following)
      return body
  return None


def test_the_lists_are_not_empty():
  # guards against a collection that silently finds nothing
  assert len(PUBLIC) > 100
  assert len(FACTORIES) >= 36
  assert {"gradcraft", "nmt", "mgda", "trimmed_mean", "moco"} <= set(FACTORIES)
  assert "from_weighting" not in FACTORIES  # a constructor, no paper of its own


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_docstring_has_examples(name):
  doc = inspect.getdoc(PUBLIC[name])
  assert doc, f"{name} has no docstring"
  if name in BARE_DOCTESTS:
    assert any(line.lstrip().startswith(">>> ") for line in doc.splitlines()), name
    return
  body = _section(doc, "Examples:")
  assert body is not None, f"{name}: no 'Examples:' section"
  first = next((line.strip() for line in body if line.strip()), "")
  assert first.startswith(">>> "), f"{name}: the 'Examples:' section does not start with >>>"


def test_bare_doctests_list_is_current():
  for name in sorted(BARE_DOCTESTS):
    assert name in PUBLIC, f"{name} is not public: remove it from BARE_DOCTESTS"
    body = _section(inspect.getdoc(PUBLIC[name]), "Examples:")
    assert body is None, f"{name} has an 'Examples:' section now: remove it from BARE_DOCTESTS"


@pytest.mark.parametrize("name", FACTORIES)
def test_method_factory_has_references(name):
  body = _section(inspect.getdoc(getattr(gj, name)), "References:")
  assert body is not None, f"{name}: no 'References:' section"
  text = " ".join(line.strip() for line in body)
  assert re.search(r"\b(19|20)\d\d\b", text), f"{name}: the references give no year: {text!r}"


def test_section_parser():
  doc = "Title.\n\nExamples:\n  >>> 1\n  1\n\nReferences:\n  A, `T <u>`_, 2020\n"
  assert _section(doc, "Examples:") == ["  >>> 1", "  1", ""]
  assert _section(doc, "References:") == ["  A, `T <u>`_, 2020"]
  assert _section(doc, "Raises:") is None


@pytest.mark.extras
def test_docs_render_examples_and_references():
  """The docs build's docstring conversion (``docs/_ext/griffe_math.py``)
  keeps a doctest inside its ``Examples:`` section and turns the reST links
  of ``References:`` into Markdown links."""
  pytest.importorskip("griffe")
  path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "_ext" / "griffe_math.py"
  spec = importlib.util.spec_from_file_location("griffe_math", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  doc = (
    "Title.\n\nExamples:\n  >>> 1 + 1\n  2\n\nReferences:\n"
    "  Author et al., `A Long\n  Title <https://arxiv.org/abs/0000.00000>`_, 2020\n"
  )
  out = module.rst_to_markdown(doc)
  assert _section(out, "Examples:") == ["  ```pycon", "  >>> 1 + 1", "  2", "  ```", ""]
  assert _section(out, "References:") == [
    "  Author et al., [A Long Title](https://arxiv.org/abs/0000.00000), 2020"
  ]
