"""The corpus' measured errors against float64, per route and dtype.

``cd tests && python -m corpus.measure [model ...]`` prints, for every route
and dtype, the largest error over the corpus' models of everything the route
is compared on (stacked gradients, Gram matrix, combined updates, losses),
relative to each leaf's scale (``check.relative_error``), and the model where
it is reached: over the models computing at full precision, and over those
with a tolerance override (bfloat16, float32 inside a float64 model). Pairs
that are known failures of ``tests/test_corpus.py`` are left out.
"""

import sys

from corpus import check, models


def main(names=None):
  from test_corpus import KNOWN_FAILURES  # noqa: PLC0415 (a test module)

  names = names or list(models.FAMILIES)
  rows = {}
  for model in names:
    group = "override" if check.get_case(model).rtol else "full"
    for dtype in check.DTYPES:
      for route in check.routes_of(model):
        err = check.relative_error(model, route, dtype)
        if err is not None and (model, route) not in KNOWN_FAILURES:
          rows.setdefault((route, dtype), {}).setdefault(group, []).append((err, model))
  print(f"{'route':18s} {'dtype':8s} {'full precision':>32s} {'tolerance override':>32s}")
  for (route, dtype), groups in sorted(rows.items()):
    cells = []
    for group in ("full", "override"):
      if group in groups:
        err, model = max(groups[group])
        cells.append(f"{err:9.2e} {model:>22s}")
      else:
        cells.append(f"{'-':>32s}")
    print(f"{route:18s} {dtype:8s} {cells[0]:>32s} {cells[1]:>32s}")


if __name__ == "__main__":
  main(sys.argv[1:])
