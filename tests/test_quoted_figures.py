"""Every figure the README (and the docs' prose around a table) quotes from a benchmark is in that benchmark's
committed result file (the table the script wrote, with its command, date
and commit): a re-run that changes a result makes this fail until the prose
is rewritten from the new file."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks"

# (page, the paragraph that starts with this text, result file).
SECTIONS = [
  ("README.md", "**Census-Income comparison**", "census_table.md"),
  ("README.md", "**GradCraft's parts**", "census_ablation_table.md"),
  ("docs/benchmarks.md", "**What the data show.** Every part ties", "census_ablation_table.md"),
  ("README.md", "**Controlled-conflict study** (`python", "conflict_table.md"),
  ("docs/benchmarks.md", "**What they show.** The knob", "conflict_cosines.md"),
  (
    "docs/benchmarks.md",
    "**What the data show** (every method of the library tuned",
    "conflict_table.md",
  ),
  ("README.md", "**Whole training step**", "train_step.md"),
  ("README.md", "**Representation-level gradients**", "representation.md"),
  ("docs/movielens.md", "**What it shows.**", "movielens_table.md"),
  ("docs/recsys.md", "**What the measurements show.**", "recsys_step.md"),
  ("docs/recsys.md", "**What it shows.** The library's general route", "recsys_handwritten.md"),
]
# Figures of a paragraph that are not results: sizes, dates, settings.
NOT_RESULTS = re.compile(
  r"\d{4}-\d\d-\d\d|\beps = \S+|\btau = [\d.]+|\bT = \d+|\d+ x \d+|0\.6-1\.1|[\d.]+M\b"
)
NUMBER = re.compile(r"(?<![\w.])[+-]?\d+\.\d+")


def _paragraph(text, start):
  i = text.index(start)
  rest = text[i:]
  # up to the next bold paragraph head, section or included table
  m = re.search(r"\n\n(\*\*|## |--8<--)", rest[len(start) :])
  return rest[: len(start) + m.start()] if m else rest


@pytest.mark.parametrize("page,start,result", SECTIONS, ids=[s[2] for s in SECTIONS])
def test_quoted_figures_are_in_their_result_file(page, start, result):
  readme = (ROOT / page).read_text()
  table = (RESULTS / result).read_text()
  assert "Command:" in table or "command" in table.lower(), f"{result} records no command"
  para = NOT_RESULTS.sub(" ", _paragraph(readme, start))
  numbers = NUMBER.findall(para)
  assert numbers, f"no figures found after {start!r}"
  missing = [n for n in numbers if n.lstrip("+") not in table]
  assert not missing, f"figures of {page} not in docs/benchmarks/{result}: {missing}"
