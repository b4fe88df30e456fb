"""The documentation site builds offline with ``mkdocs build --strict``.

Strict mode turns every warning into an error: broken links and anchors,
nav entries without a file (the quickstart notebook included), docstrings
that document parameters a function does not have, and so on.
"""

import html.parser
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "quickstart.ipynb"

# The docs toolchain is the ``docs`` extra, not the ``test`` one.
pytestmark = pytest.mark.extras


def test_mkdocs_build_strict(tmp_path):
  for module in ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter"):
    pytest.importorskip(module)
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
  # Objects are documented under their public names: stable anchors.
  for anchor in (
    "gradcraft_jax.gradcraft",
    "gradcraft_jax.methods.gradcraft_weights",
    "gradcraft_jax.mgda",
    "gradcraft_jax.methods.mgda_weights",
    "gradcraft_jax.Weighting",
    "gradcraft_jax.from_weighting",
    "gradcraft_jax.task_weights",
    "gradcraft_jax.gram_matrix",
    "gradcraft_jax.weighted_sum",
  ):
    assert f'id="{anchor}"' in api, anchor
  assert 'id="gradcraft_jax.methods._' not in api  # no private module in an anchor
  # The three steps of every method, in order, then the methods.
  sections = [
    "1-gram-matrix",
    "2-weighting-gram-matrix-to-task-weights",
    "3-weighted-sum",
    "methods",
  ]
  positions = [api.index(f'id="{s}"') for s in sections]
  assert positions == sorted(positions)
  assert "arithmatex" in api  # docstring math was converted for MathJax
  check_offline_math(site)
  check_no_network(site)


_SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc=\"([^\"]+)\"", re.IGNORECASE)


def check_offline_math(site):
  """Math renders without network access: no page loads a script over
  http(s), and the MathJax build every page loads is in the site."""
  mathjax = site / "javascripts" / "mathjax" / "tex-svg.js"
  assert mathjax.is_file() and mathjax.stat().st_size > 100_000
  assert (site / "javascripts" / "mathjax" / "input" / "tex" / "extensions").is_dir()
  pages = list(site.rglob("*.html"))
  assert len(pages) >= 5
  for page in pages:
    srcs = _SCRIPT_SRC.findall(page.read_text(encoding="utf-8"))
    remote = [s for s in srcs if re.match(r"(https?:)?//", s)]
    assert not remote, f"{page.relative_to(site)} loads scripts from the network: {remote}"
    if page.name == "index.html" and page.parent == site:
      assert any(s.endswith("javascripts/mathjax/tex-svg.js") for s in srcs), srcs


_REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
# Attributes whose URL a browser fetches by itself (links to follow, <a href>,
# are not fetched). <link href> covers stylesheets, fonts, preconnect and
# prefetch; srcset may list several URLs.
_FETCHED = {"src", "href", "srcset", "data", "poster", "background", "action"}
_INLINE_URL = re.compile(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", re.IGNORECASE)
_NAMESPACE = re.compile(r"(https?:)?//www\.w3\.org/", re.IGNORECASE)
_CSS_URL = re.compile(r"(?:@import|url\()\s*['\"]?((?:https?:)?//[^'\")\s]+)", re.IGNORECASE)


class _Resources(html.parser.HTMLParser):
  """Collects what a page would load from another host: URL attributes of
  every tag but ``<a>``, and URLs inside inline ``<script>`` and ``<style>``."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.remote: list[str] = []
    self._inline = None
    self.repo_facts = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("data-md-component") == "source":  # the theme's GitHub API call
      self.repo_facts = True
    if tag != "a":
      for name, value in attrs.items():
        if name in _FETCHED and value:
          self.remote += [f"<{tag} {name}={u}>" for u in value.split(",") if _REMOTE.match(u)]
    style = attrs.get("style") or ""
    self.remote += [f"<{tag} style>: {u}" for u in _CSS_URL.findall(style)]
    self._inline = tag if tag in ("script", "style") else None

  def handle_endtag(self, tag):
    self._inline = None

  def handle_data(self, data):
    if self._inline == "style":
      self.remote += [f"inline <style>: {u}" for u in _CSS_URL.findall(data)]
    elif self._inline == "script":
      # Any URL in a script but XML namespace names (never fetched).
      urls = [u for u in _INLINE_URL.findall(data) if not _NAMESPACE.match(u)]
      self.remote += [f"inline <script>: {u}" for u in urls]


def check_no_network(site):
  """No page of the site fetches anything from another host: no stylesheet,
  font, script, image or frame from http(s), no URL in an inline script or
  style (web fonts, CDN loaders), no repository facts from the GitHub API,
  and no stylesheet of the site imports a remote one."""
  pages = list(site.rglob("*.html"))
  assert len(pages) >= 5
  for page in pages:
    parser = _Resources()
    parser.feed(page.read_text(encoding="utf-8"))
    where = page.relative_to(site)
    assert not parser.remote, f"{where} loads from the network: {parser.remote[:5]}"
    assert not parser.repo_facts, f"{where} fetches repository facts from GitHub"
  for css in site.rglob("*.css"):
    text = css.read_text(encoding="utf-8", errors="replace")
    remote = _CSS_URL.findall(text)
    assert not remote, f"{css.relative_to(site)} loads from the network: {remote[:5]}"
