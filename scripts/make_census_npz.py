"""Builds gradcraft_jax/data/census_income.npz from the original UCI files.

Usage::

    python scripts/make_census_npz.py /path/to/census-income-dir [out.npz]

The directory must hold ``census-income.data[.gz]`` and ``census-income.test[.gz]``
(the UCI Census-Income (KDD) files; Terran Lane and Ronny Kohavi, CC BY 4.0).
The output keeps every row; categorical columns are stored as small unsigned
integer codes into per-column sorted vocabularies, numeric columns as int32
(they are all integers), the instance weight is dropped.  All encoding,
standardisation and splitting happens in
:func:`gradcraft_jax.datasets.load_census_income`, so loading the npz or the
original directory gives the same arrays.
"""

from __future__ import annotations

import argparse
import os
import sys

from gradcraft_jax.datasets.census import load_census_income, write_compact_npz

DEFAULT_OUT = os.path.join(
  os.path.dirname(__file__), "..", "gradcraft_jax", "data", "census_income.npz"
)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "src_dir", help="directory with census-income.data[.gz] and census-income.test[.gz]"
  )
  parser.add_argument(
    "out", nargs="?", default=DEFAULT_OUT, help="output .npz (default: the bundled copy)"
  )
  parser.add_argument(
    "--no-check", action="store_true", help="skip re-loading both paths and comparing"
  )
  args = parser.parse_args(argv)

  arrays = write_compact_npz(args.src_dir, args.out)
  size = os.path.getsize(args.out)
  print(
    f"wrote {os.path.abspath(args.out)}: {size / 2**20:.2f} MiB, "
    f"{arrays['train_codes'].shape[0]} train + {arrays['test_codes'].shape[0]} test rows"
  )
  if not args.no_check:
    a = load_census_income(args.out)
    b = load_census_income(args.src_dir)
    for name in ("train", "val", "test"):
      for field in ("cat", "num", "labels"):
        x, y = getattr(getattr(a, name), field), getattr(getattr(b, name), field)
        if x.shape != y.shape or not (x == y).all():
          print(f"MISMATCH in {name}.{field}", file=sys.stderr)
          return 1
    assert a.cardinalities == b.cardinalities
    print("npz and original files give identical arrays")
  return 0


if __name__ == "__main__":
  sys.exit(main())
