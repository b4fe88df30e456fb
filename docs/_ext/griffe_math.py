"""Griffe extension of the docs build: reST-isms in docstrings -> Markdown.

The library's docstrings are Google style but use a few reStructuredText
constructs that Python-Markdown does not understand. Before mkdocstrings
parses a docstring this extension rewrites, in the rendered copy only (the
source files are untouched):

* ``:math:`x``` -> ``$x$`` and ``.. math:: x`` blocks -> ``$$ x $$``
  (rendered by pymdownx.arithmatex + MathJax);
* ``:func:`f``` and the other Sphinx roles -> ```f``` (inline code);
* doctest blocks (``>>>`` lines and their output) -> ```` ```pycon ```` fences
  (Markdown would read ``>>>`` as nested block quotes);
* ``a, b, c: description`` items of an ``Args:`` section -> one item per
  name (Google style documents one parameter per item);
* list-item continuation lines re-indented from the reST text column to
  Markdown's 4 spaces;
* ``text::`` + indented literal block -> ``text:`` + a ```` ```python ```` fence;
* hyperlinks ```Title <url>`_`` (the ``References:`` entries) -> ``[Title](url)``.
"""

from __future__ import annotations

import re

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]*)`", re.DOTALL)
_MULTI_ARG = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):\s(.*)$")
_XREF_ROLE = re.compile(
  r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|ref)"
  r":`~?([^`]*)`"
)
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>\s]+)>`__?")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> int:
  """End (exclusive) of the block indented deeper than ``base`` at ``start``,
  blank lines included but trailing blank lines excluded."""
  end = start
  j = start
  while j < len(lines):
    if lines[j].strip():
      if _indent(lines[j]) <= base:
        break
      end = j + 1
    j += 1
  return end


_LIST_ITEM = re.compile(r"^(\s*)(\d+\.|[*+-])\s+\S")


def _reindent_list_items(lines: list[str]) -> list[str]:
  """reST continues a list item at its text column ("1. " -> 3 spaces);
  Markdown wants 4 spaces beyond the marker's indentation."""
  out = []
  base = col = None
  for line in lines:
    m = _LIST_ITEM.match(line)
    ind = _indent(line)
    if m:
      if base is not None and out and out[-1].strip():
        out.append("")  # else Markdown reads the item as lazy continuation
      base, col = len(m.group(1)), len(m.group(1)) + len(m.group(2)) + 1
      out.append(line)
      continue
    if base is not None and line.strip():
      if ind >= col:
        line = " " * (ind - col + base + 4) + line.lstrip()
      elif ind <= base:
        base = col = None
    out.append(line)
  return out


def rst_to_markdown(text: str) -> str:
  lines = _reindent_list_items(text.splitlines())
  out: list[str] = []
  i = 0
  section = ""
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    ind = " " * _indent(line)
    if _indent(line) == 0 and stripped.endswith(":"):
      section = stripped
    elif _indent(line) == 0 and stripped:
      section = ""
    m = _MULTI_ARG.match(line)
    if section in ("Args:", "Arguments:", "Parameters:") and m:
      names = [n.strip() for n in m.group(2).split(",")]
      out += [f"{m.group(1)}{n}: {m.group(3)}" for n in names]
      i += 1
      continue
    if stripped.startswith(".. math::"):
      # Markdown continues a list item with 4 spaces (reST: the item's text
      # column, e.g. 3 for "1. "): round the indentation up.
      ind = " " * (-(-len(ind) // 4) * 4)
      first = stripped[len(".. math::") :].strip()
      end = _block(lines, i + 1, _indent(line))
      body = ([first] if first else []) + [l.strip() for l in lines[i + 1 : end] if l.strip()]
      out += ["", ind + "$$", *(ind + b for b in body), ind + "$$", ""]
      i = end
      continue
    if stripped.startswith(">>>"):
      j = i
      while j < len(lines) and lines[j].strip():
        j += 1
      out += [
        ind + "```pycon",
        *(l if l.startswith(ind) else ind + l.strip() for l in lines[i:j]),
        ind + "```",
      ]
      i = j
      continue
    if (
      stripped.endswith("::")
      and not stripped.startswith("..")
      and i + 1 < len(lines)
      and not lines[i + 1].strip()
    ):
      end = _block(lines, i + 2, _indent(line))
      if end > i + 2:
        code = lines[i + 2 : end]
        sub = min(_indent(l) for l in code if l.strip())
        out += [
          line[:-1] if stripped != "::" else "",
          "",
          ind + "```python",
          *(ind + l[sub:] for l in code),
          ind + "```",
        ]
        i = end
        continue
    out.append(line)
    i += 1
  text = "\n".join(out)
  text = _MATH_ROLE.sub(lambda m: "$" + " ".join(m.group(1).split()) + "$", text)
  text = _LINK.sub(lambda m: "[" + " ".join(m.group(1).split()) + "](" + m.group(2) + ")", text)
  return _XREF_ROLE.sub(lambda m: "`" + m.group(1) + "`", text)


class RstToMarkdown(griffe.Extension):
  """Rewrites every docstring with :func:`rst_to_markdown`."""

  def on_object(self, *, obj, loader, **kwargs):
    del loader, kwargs
    if obj.docstring is not None:
      obj.docstring.value = rst_to_markdown(obj.docstring.value)
