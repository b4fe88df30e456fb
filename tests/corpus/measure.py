"""The corpus' measured errors against float64, per route and dtype.

``cd tests && python -m corpus.measure [--out FILE] [model ...]`` prints, for
every route and dtype, the largest error over the corpus' models of
everything the route is compared on (stacked gradients, Gram matrix,
combined updates, losses), relative to each leaf's scale
(``check.relative_error``), and the model where it is reached: over the
models computing at full precision, and over those with a tolerance override
(bfloat16, float32 inside a float64 model). Pairs that are known failures of
``tests/test_corpus.py`` are left out. ``--out`` also writes the table as
Markdown with the command, date, commit and versions
(``docs/benchmarks/corpus_errors.md``).
"""

import argparse
import datetime
import os
import platform
import sys

import jax

from corpus import check, models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import run_meta  # noqa: E402


def measure(names):
  """``{(route, dtype): {"full"|"override": [(error, model), ...]}}``."""
  from test_corpus import KNOWN_FAILURES  # noqa: PLC0415 (a test module)

  rows = {}
  for model in names:
    group = "override" if check.get_case(model).rtol else "full"
    for dtype in check.DTYPES:
      for route in check.routes_of(model):
        err = check.relative_error(model, route, dtype)
        if err is not None and (model, route) not in KNOWN_FAILURES:
          rows.setdefault((route, dtype), {}).setdefault(group, []).append((err, model))
  return rows


def _cells(groups):
  cells = []
  for group in ("full", "override"):
    if group in groups:
      err, model = max(groups[group])
      cells.append((f"{err:.2e}", model))
    else:
      cells.append(("-", ""))
  return cells


def markdown(rows, names, argv):
  """The table as Markdown with its provenance."""
  lines = [
    "# Fast-route errors on the test corpus",
    "",
    f"Command: `cd tests && python -m corpus.measure {' '.join(argv)}`  ",
    f"Date: {datetime.date.today().isoformat()}  ",
    f"Commit: {run_meta.commit()}  ",
    f"Machine: {platform.machine()}, jax {jax.__version__} ({jax.default_backend()})",
    "",
    f"Largest error over the {len(names)} model families of `tests/corpus/models.py` of "
    "everything a route is compared on (losses, stacked gradients, Gram matrix, combined "
    "updates of a Gram-linear method and of `mean()`), against `jax.jacrev` of the same "
    "model in float64, each leaf's error relative to its largest entry; the model where it "
    "is reached. *Full precision*: the models computing in the dtype of the run; "
    "*tolerance override*: the models that compute part of the step at a lower precision "
    "on purpose (bfloat16 layers, float32 inside a float64 model).",
    "",
    "| route | dtype | full precision | model | tolerance override | model |",
    "|---|---|---:|---|---:|---|",
  ]
  for (route, dtype), groups in sorted(rows.items()):
    (e1, m1), (e2, m2) = _cells(groups)
    lines.append(f"| `{route}` | {dtype} | {e1} | {m1} | {e2} | {m2} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the table as Markdown to this file")
  parser.add_argument("models", nargs="*", help="model families (default: all)")
  args = parser.parse_args(argv)
  names = args.models or list(models.FAMILIES)
  rows = measure(names)
  print(f"{'route':18s} {'dtype':8s} {'full precision':>32s} {'tolerance override':>32s}")
  for (route, dtype), groups in sorted(rows.items()):
    cells = [f"{e:>9s} {m:>22s}" for e, m in _cells(groups)]
    print(f"{route:18s} {dtype:8s} {cells[0]:>32s} {cells[1]:>32s}")
  if args.out:
    with open(args.out, "w") as f:
      f.write(markdown(rows, names, argv))


if __name__ == "__main__":
  main()
