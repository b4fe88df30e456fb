"""Runs the compatibility matrix tests and writes docs/compatibility.md.

    python scripts/compat_matrix.py            # every cell (slow ones too)
    python scripts/compat_matrix.py --output /tmp/compat.md
    python scripts/compat_matrix.py --junit run.xml           # keep the outcomes
    python scripts/compat_matrix.py --from-junit run.xml      # render them again

The page is generated from the outcomes of ``tests/test_compat_matrix.py``
(one test per placement and method, parametrised over
``tests/method_cases.py``), never written by hand: a cell reads "yes" only
when its test passed. The column list and what each placement means come
from ``CELLS`` in the test file.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
COMMAND = "python scripts/compat_matrix.py"


def run_tests(junit: pathlib.Path) -> tuple[int, float]:
  start = time.perf_counter()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      str(TESTS / "test_compat_matrix.py"),
      "-q",
      f"--junitxml={junit}",
    ],
    cwd=ROOT,
  )
  return proc.returncode, time.perf_counter() - start


def outcomes(junit: pathlib.Path) -> dict[tuple[str, str], str]:
  """``(test function, method) -> "passed" | "failed" | "skipped"``."""
  out = {}
  for case in ET.parse(junit).getroot().iter("testcase"):
    m = re.fullmatch(r"(test_\w+)\[(.+)\]", case.get("name", ""))
    if not m:
      continue
    if case.find("failure") is not None or case.find("error") is not None:
      status = "failed"
    elif case.find("skipped") is not None:
      status = "skipped"
    else:
      status = "passed"
    out[(m.group(1), m.group(2))] = status
  return out


def render(results, cells, methods, seconds) -> str:
  today = datetime.date.today().isoformat()
  works = {"passed": "yes", "failed": "**FAIL**", "skipped": "skipped"}
  fails = {"passed": "no (a)", "failed": "**?**", "skipped": "skipped"}
  lines = [
    "# Compatibility matrix",
    "",
    "Every method of the library in every placement optax, Flax and Orbax",
    "allow, generated from the outcomes of `tests/test_compat_matrix.py`",
    f"(command: `{COMMAND}`, run on {today}, {len(results)} tests in",
    f"{seconds:.0f} s). A cell reads *yes* only when its test passed: the",
    "placement trains the tiny three-task model of the test (a shared layer and",
    "one tower per task) for a few steps and",
    "matches the plain `optax.chain(method, optax.adam(...))` on the same",
    "batches (bit for bit where stated below). *no (a)*: the placement cannot",
    "work with a chain whose input has a task axis; the test checks that it",
    "fails at the first update (never silently) and the legend says what to",
    "use instead. See [Robustness](robustness.md) for the wrappers.",
    "",
  ]
  titles = [cells[c][0] for c in cells]
  lines.append("| method | " + " | ".join(titles) + " |")
  lines.append("|---|" + "---|" * len(titles))
  for name in methods:
    row = []
    for fn, (_, kind, _) in cells.items():
      status = results.get((fn, name))
      if status is None:
        row.append("not run")
      else:
        row.append((works if kind == "works" else fails)[status])
    lines.append(f"| `{name}` | " + " | ".join(row) + " |")
  lines += ["", "## What each column runs", "", "| column | how | test |", "|---|---|---|"]
  for fn, (title, _, how) in cells.items():
    lines.append(f"| {title} | {how} | `{fn}` |")
  lines += [
    "",
    "(a) Use the library's wrapper instead: `gradcraft_jax.apply_if_finite` for",
    "`optax.apply_if_finite` and `gradcraft_jax.MultiSteps` for",
    "`optax.MultiSteps` around a chain that starts with a method. Inside the",
    "chain, after the method, optax's wrappers see parameter-shaped updates",
    "and work.",
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", type=pathlib.Path, default=ROOT / "docs" / "compatibility.md")
  parser.add_argument("--junit", type=pathlib.Path, help="keep pytest's JUnit XML here")
  parser.add_argument(
    "--from-junit", type=pathlib.Path, help="render a kept JUnit XML instead of running"
  )
  args = parser.parse_args(argv)
  sys.path.insert(0, str(TESTS))
  import test_compat_matrix  # noqa: E402  (the column list and methods)

  if args.from_junit is not None:
    code = 0
    root = ET.parse(args.from_junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    seconds = float(suite.get("time", "nan"))
    results = outcomes(args.from_junit)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      junit = args.junit or pathlib.Path(tmp) / "junit.xml"
      code, seconds = run_tests(junit)
      results = outcomes(junit)
  page = render(results, test_compat_matrix.CELLS, test_compat_matrix.IDS, seconds)
  args.output.write_text(page, encoding="utf-8")
  print(f"wrote {args.output} ({len(results)} cells, pytest exit code {code})")
  return code


if __name__ == "__main__":
  sys.exit(main())
