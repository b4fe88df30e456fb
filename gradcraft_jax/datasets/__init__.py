"""Real-world multi-task data sets (numpy only, no JAX dependency at import time).

:func:`load_census_income`: the UCI Census-Income (KDD) data set as a
three-task problem (income > 50K, never married, bachelor's degree or above).
"""

from gradcraft_jax.datasets.census import (
  TASK_NAMES,
  CensusIncome,
  Split,
  iterate_batches,
  load_census_income,
  write_compact_npz,
)

__all__ = [
  "TASK_NAMES",
  "CensusIncome",
  "Split",
  "iterate_batches",
  "load_census_income",
  "write_compact_npz",
]
