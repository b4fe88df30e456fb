"""The corpus' measured errors against float64, per route and dtype.

``cd tests && python -m corpus.measure`` prints, for every route, the
largest error over the corpus' models of everything the route is compared on
(stacked gradients, Gram matrix, combined updates, losses), relative to each
leaf's scale (``check.relative_error``), in float64 and float32, and the
models where it is reached. Models whose pair is a known failure of
``tests/test_corpus.py`` are listed apart.
"""

import sys

from corpus import check, models


def main(names=None):
  sys.path.insert(0, ".")
  from test_corpus import KNOWN_FAILURES  # noqa: PLC0415

  names = names or list(models.FAMILIES)
  rows = {}
  for model in names:
    for dtype in check.DTYPES:
      for route in check.routes_of(model):
        err = check.relative_error(model, route, dtype)
        if err is not None:
          known = (model, route) in KNOWN_FAILURES
          rows.setdefault((route, dtype, known), []).append((err, model))
  print(f"{'route':20s} {'dtype':8s} {'max rel. error':>14s}  model (known failures apart)")
  for (route, dtype, known), errs in sorted(rows.items()):
    err, model = max(errs)
    tag = " [known failure]" if known else ""
    print(f"{route:20s} {dtype:8s} {err:14.3g}  {model}{tag}")


if __name__ == "__main__":
  main(sys.argv[1:])
