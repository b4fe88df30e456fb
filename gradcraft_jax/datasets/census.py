"""Census-Income (KDD) as a three-task binary classification problem.

The UCI "Census-Income (KDD)" data set (Terran Lane and Ronny Kohavi, 2000;
CC BY 4.0) holds 199,523 training and 99,762 test rows of 42 comma-separated
columns.  Following the multi-task literature (MMoE, PLE, GradCraft) three
binary tasks are derived from it:

``income``
    total person income above 50K (column 41, the UCI label).
``never_married``
    marital status (column 7) equal to ``"Never married"``.
``education``
    education (column 4) at bachelor's degree or above (Bachelors, Masters,
    Prof school, Doctorate).

The label columns 41, 7 and 4 and the instance weight (column 24) are removed
from the features.  Seven columns are numeric (age, wage per hour, capital
gains, capital losses, dividends, number of persons worked for employer,
weeks worked in year); the other 31 (including the coded industry and
occupation recodes 2 and 3, the coded columns 36 and 38 and the year 40) are
categorical.

Note: columns 22 and 23 (detailed household and family status / household
summary) contain values such as ``"Child 18+ never marr ..."`` and are strong
proxies of the ``never_married`` task.  They are kept, as in the usual MMoE
setup; that task is therefore easy (AUC close to 1).

Preprocessing (identical whether the data come from the bundled ``.npz`` or
from the original UCI files):

* optional subsampling of each UCI file to ``max_rows`` rows (fixed seed);
* a validation split carved from the UCI training file, **stratified** on the
  joint pattern of the three labels (8 strata), with a fixed seed;
* categorical columns integer-encoded with the vocabulary of the remaining
  training rows: id 0 is the out-of-vocabulary (OOV) id, known values get ids
  ``1..K`` in sorted string order, so the cardinality is ``K + 1``;
* numeric columns: ``log1p`` of the heavy-tailed money columns (wage per hour,
  capital gains, capital losses, dividends) when ``log1p_money=True``, then
  standardisation with the training-split mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

__all__ = [
  "CensusIncome",
  "Split",
  "TASK_NAMES",
  "COLUMN_NAMES",
  "load_census_income",
  "iterate_batches",
  "write_compact_npz",
]

LICENSE = (
  "Census-Income (KDD) data set, UCI Machine Learning Repository, "
  "Terran Lane and Ronny Kohavi (2000), https://doi.org/10.24432/C5N30T. "
  "Licensed under Creative Commons Attribution 4.0 International (CC BY 4.0). "
  "This file holds an integer-encoded copy of the original columns "
  "(all rows, the instance weight column dropped)."
)

#: Column names of the 42 UCI columns (numbered from 0), after census-income.names.
COLUMN_NAMES: tuple[str, ...] = (
  "age",  # 0
  "class_of_worker",  # 1
  "detailed_industry_recode",  # 2
  "detailed_occupation_recode",  # 3
  "education",  # 4
  "wage_per_hour",  # 5
  "enroll_in_edu_inst_last_wk",  # 6
  "marital_stat",  # 7
  "major_industry_code",  # 8
  "major_occupation_code",  # 9
  "race",  # 10
  "hispanic_origin",  # 11
  "sex",  # 12
  "member_of_a_labor_union",  # 13
  "reason_for_unemployment",  # 14
  "full_or_part_time_employment_stat",  # 15
  "capital_gains",  # 16
  "capital_losses",  # 17
  "dividends_from_stocks",  # 18
  "tax_filer_stat",  # 19
  "region_of_previous_residence",  # 20
  "state_of_previous_residence",  # 21
  "detailed_household_and_family_stat",  # 22
  "detailed_household_summary_in_household",  # 23
  "instance_weight",  # 24
  "migration_code_change_in_msa",  # 25
  "migration_code_change_in_reg",  # 26
  "migration_code_move_within_reg",  # 27
  "live_in_this_house_1_year_ago",  # 28
  "migration_prev_res_in_sunbelt",  # 29
  "num_persons_worked_for_employer",  # 30
  "family_members_under_18",  # 31
  "country_of_birth_father",  # 32
  "country_of_birth_mother",  # 33
  "country_of_birth_self",  # 34
  "citizenship",  # 35
  "own_business_or_self_employed",  # 36
  "fill_inc_questionnaire_for_veterans_admin",  # 37
  "veterans_benefits",  # 38
  "weeks_worked_in_year",  # 39
  "year",  # 40
  "income",  # 41
)
N_COLUMNS = 42

TASK_NAMES: tuple[str, ...] = ("income", "never_married", "education")

_INCOME_COL, _MARITAL_COL, _EDUCATION_COL, _WEIGHT_COL = 41, 7, 4, 24
_NUM_COLS: tuple[int, ...] = (0, 5, 16, 17, 18, 30, 39)
_MONEY_COLS: tuple[int, ...] = (5, 16, 17, 18)
_LABEL_COLS: tuple[int, ...] = (_INCOME_COL, _MARITAL_COL, _EDUCATION_COL)
# Raw categorical columns kept in the compact copy: everything except the
# numeric columns and the instance weight (label columns included).
_RAW_CAT_COLS: tuple[int, ...] = tuple(
  j for j in range(N_COLUMNS) if j not in _NUM_COLS and j != _WEIGHT_COL
)
# Categorical feature columns: raw categorical columns minus the label columns.
_FEATURE_CAT_COLS: tuple[int, ...] = tuple(j for j in _RAW_CAT_COLS if j not in _LABEL_COLS)

_INCOME_POSITIVE = "50000+."
_NEVER_MARRIED = "Never married"
_BACHELOR_PLUS = frozenset(
  {
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
  }
)

_FILES = {"train": "census-income.data", "test": "census-income.test"}
_BUNDLED = "census_income.npz"


class Split(NamedTuple):
  """One split of the data set (a JAX pytree).

  Attributes:
    cat: int32 array ``(n, n_cat)`` of categorical ids (0 = out of vocabulary).
    num: float32 array ``(n, n_num)`` of standardised numeric features.
    labels: float32 array ``(n, 3)`` of 0/1 labels, columns in ``TASK_NAMES`` order.
  """

  cat: np.ndarray
  num: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    """Number of rows ``n``."""
    return int(self.labels.shape[0])

  def as_dict(self) -> dict[str, np.ndarray]:
    """Returns ``{"cat": ..., "num": ..., "labels": ...}``."""
    return {"cat": self.cat, "num": self.num, "labels": self.labels}


@dataclasses.dataclass(frozen=True)
class CensusIncome:
  """The preprocessed Census-Income multi-task data set.

  Examples:
    >>> data = load_census_income(max_rows=1000)  # a quick subsample
    >>> data.task_names, data.num_tasks
    (('income', 'never_married', 'education'), 3)
    >>> len(data.cardinalities) == data.train.cat.shape[1], data.num_numeric
    (True, 7)

  Attributes:
    train, val, test: the three :class:`Split` s.
    cardinalities: per categorical feature column, the number of ids
      (training vocabulary size + 1 for the OOV id 0).
    task_names: ``("income", "never_married", "education")``.
    cat_names: names of the categorical feature columns, ``len == n_cat``.
    num_names: names of the numeric feature columns, ``len == n_num``.
    num_mean, num_std: training statistics used to standardise ``num``
      (after the optional ``log1p``), float32 ``(n_num,)``.
  """

  train: Split
  val: Split
  test: Split
  cardinalities: tuple[int, ...]
  task_names: tuple[str, ...]
  cat_names: tuple[str, ...]
  num_names: tuple[str, ...]
  num_mean: np.ndarray
  num_std: np.ndarray

  @property
  def num_tasks(self) -> int:
    """Number of tasks ``T`` (3)."""
    return len(self.task_names)

  @property
  def num_numeric(self) -> int:
    """Number of numeric feature columns."""
    return len(self.num_names)


# --------------------------------------------------------------------------
# Raw (integer-encoded, unprocessed) representation shared by both paths.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Raw:
  """Raw columns of both UCI files.

  vocab: per entry of ``_RAW_CAT_COLS``, a sorted 1-D str array of values
    (whitespace stripped), shared by the train and test files.
  codes: ``{"train"|"test": int array (n, len(_RAW_CAT_COLS))}`` indices into vocab.
  numeric: ``{"train"|"test": float array (n, len(_NUM_COLS))}``.
  """

  vocab: list[np.ndarray]
  codes: dict[str, np.ndarray]
  numeric: dict[str, np.ndarray]


def _open_text(path: str):
  with open(path, "rb") as fh:
    magic = fh.read(2)
  if magic == b"\x1f\x8b":
    return gzip.open(path, "rt", encoding="latin-1")
  return open(path, encoding="latin-1")


def _find_file(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"neither {stem}.gz nor {stem} found in {directory!r}")


def _parse_uci_file(path: str) -> list[list[str]]:
  rows = []
  with _open_text(path) as fh:
    for lineno, line in enumerate(fh, 1):
      if not line.strip():
        continue
      fields = [f.strip() for f in line.rstrip("\r\n").split(",")]
      if len(fields) != N_COLUMNS:
        raise ValueError(f"{path}:{lineno}: expected {N_COLUMNS} fields, got {len(fields)}")
      rows.append(fields)
  return rows


def _raw_from_uci_dir(directory: str) -> _Raw:
  parsed = {split: _parse_uci_file(_find_file(directory, stem)) for split, stem in _FILES.items()}
  columns = {
    split: list(zip(*rows)) if rows else [()] * N_COLUMNS for split, rows in parsed.items()
  }
  n = {split: len(rows) for split, rows in parsed.items()}
  vocab: list[np.ndarray] = []
  codes: dict[str, list[np.ndarray]] = {"train": [], "test": []}
  for j in _RAW_CAT_COLS:
    both = np.asarray(list(columns["train"][j]) + list(columns["test"][j]), dtype=str)
    uniq, inverse = np.unique(both, return_inverse=True)
    vocab.append(uniq)
    codes["train"].append(inverse[: n["train"]])
    codes["test"].append(inverse[n["train"] :])
  numeric = {
    split: np.asarray(
      [[float(v) for v in columns[split][j]] for j in _NUM_COLS], dtype=np.float64
    ).T.reshape(n[split], len(_NUM_COLS))
    for split in _FILES
  }
  return _Raw(
    vocab=vocab,
    codes={
      s: np.stack(c, axis=1).reshape(n[s], len(_RAW_CAT_COLS)).astype(np.int64)
      for s, c in codes.items()
    },
    numeric=numeric,
  )


def _smallest_uint(max_value: int) -> type:
  for dtype in (np.uint8, np.uint16, np.uint32):
    if max_value <= np.iinfo(dtype).max:
      return dtype
  return np.int64


def _raw_to_npz_arrays(raw: _Raw) -> dict[str, np.ndarray]:
  max_code = max(len(v) for v in raw.vocab) - 1
  code_dtype = _smallest_uint(max(max_code, 0))
  arrays: dict[str, np.ndarray] = {
    "format_version": np.asarray(1, dtype=np.int32),
    "license": np.asarray(LICENSE),
    "column_names": np.asarray(COLUMN_NAMES),
    "cat_columns": np.asarray(_RAW_CAT_COLS, dtype=np.int16),
    "num_columns": np.asarray(_NUM_COLS, dtype=np.int16),
  }
  for split in _FILES:
    arrays[f"{split}_codes"] = raw.codes[split].astype(code_dtype)
    numeric = raw.numeric[split]
    if np.all(numeric == np.round(numeric)) and np.all(np.abs(numeric) < 2**31):
      arrays[f"{split}_numeric"] = numeric.astype(np.int32)  # exact and compresses better
    else:
      arrays[f"{split}_numeric"] = numeric.astype(np.float32)
  for j, v in zip(_RAW_CAT_COLS, raw.vocab):
    arrays[f"vocab_{j}"] = np.asarray(v, dtype=str)
  return arrays


def _raw_from_npz(path_or_file) -> _Raw:
  with np.load(path_or_file, allow_pickle=False) as z:
    if (
      tuple(int(c) for c in z["cat_columns"]) != _RAW_CAT_COLS
      or tuple(int(c) for c in z["num_columns"]) != _NUM_COLS
    ):
      raise ValueError("unexpected column layout in census npz file")
    return _Raw(
      vocab=[np.asarray(z[f"vocab_{j}"]) for j in _RAW_CAT_COLS],
      codes={s: z[f"{s}_codes"].astype(np.int64) for s in _FILES},
      numeric={s: z[f"{s}_numeric"].astype(np.float64) for s in _FILES},
    )


def write_compact_npz(
  src_dir: str | os.PathLike, out_file: str | os.PathLike
) -> dict[str, np.ndarray]:
  """Writes the compact integer-encoded copy of the original UCI files.

  Args:
    src_dir: directory holding ``census-income.data[.gz]`` and
      ``census-income.test[.gz]`` in the original UCI format.
    out_file: destination ``.npz`` (written with ``np.savez_compressed``).

  Returns:
    The dict of arrays written: per raw categorical column ``j`` a sorted
    vocabulary ``vocab_j`` (str), ``{train,test}_codes`` (uint8/uint16
    ``(n, 34)``, one column per non-numeric UCI column except the instance
    weight, labels included), ``{train,test}_numeric`` (``(n, 7)``),
    and metadata (``license``, ``column_names``, ``cat_columns``, ``num_columns``).
    :func:`load_census_income` gives identical arrays from this file and
    from ``src_dir``.

  Examples:
    >>> import os, tempfile
    >>> row = ",".join(["1"] * 42) + "\\n"  # one UCI row: 42 fields
    >>> with tempfile.TemporaryDirectory() as src:
    ...   for name in ("census-income.data", "census-income.test"):
    ...     with open(os.path.join(src, name), "w") as fh:
    ...       _ = fh.write(row * 3)
    ...   arrays = write_compact_npz(src, os.path.join(src, "census.npz"))
    >>> arrays["train_codes"].shape, arrays["test_numeric"].shape  # 34 coded, 7 numeric
    ((3, 34), (3, 7))
  """
  raw = _raw_from_uci_dir(os.fspath(src_dir))
  arrays = _raw_to_npz_arrays(raw)
  # numeric and unicode arrays only; the loader reads with allow_pickle=False too
  np.savez_compressed(os.fspath(out_file), allow_pickle=False, **arrays)
  return arrays


# --------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------


def _labels_from_raw(raw: _Raw, codes: np.ndarray) -> np.ndarray:
  def column_is(col: int, positive) -> np.ndarray:
    k = _RAW_CAT_COLS.index(col)
    is_pos = np.asarray([v in positive for v in raw.vocab[k]], dtype=bool)
    return is_pos[codes[:, k]] if len(is_pos) else np.zeros(codes.shape[0], bool)

  labels = np.stack(
    [
      column_is(_INCOME_COL, {_INCOME_POSITIVE}),
      column_is(_MARITAL_COL, {_NEVER_MARRIED}),
      column_is(_EDUCATION_COL, _BACHELOR_PLUS),
    ],
    axis=1,
  )
  return labels.astype(np.float32).reshape(codes.shape[0], len(TASK_NAMES))


def _subsample(n: int, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
  if max_rows is None or max_rows >= n:
    return np.arange(n)
  if max_rows < 0:
    raise ValueError(f"max_rows must be non-negative, got {max_rows}")
  return np.sort(rng.choice(n, size=max_rows, replace=False))


def _stratified_val_mask(
  labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
  strata = (labels.astype(np.int64) * (2 ** np.arange(labels.shape[1]))).sum(axis=1)
  mask = np.zeros(labels.shape[0], dtype=bool)
  for s in np.unique(strata):
    idx = np.flatnonzero(strata == s)
    n_val = int(round(val_fraction * len(idx)))
    mask[rng.permutation(idx)[:n_val]] = True
  return mask


def _preprocess(
  raw: _Raw, *, val_fraction: float, seed: int, max_rows: int | None, log1p_money: bool
) -> CensusIncome:
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  rng = np.random.default_rng(seed)
  rows = {s: _subsample(raw.codes[s].shape[0], max_rows, rng) for s in ("train", "test")}
  codes = {s: raw.codes[s][rows[s]] for s in rows}
  numeric = {s: raw.numeric[s][rows[s]] for s in rows}
  labels = {s: _labels_from_raw(raw, codes[s]) for s in rows}

  val_mask = _stratified_val_mask(labels["train"], val_fraction, rng)
  parts = {
    "train": (codes["train"][~val_mask], numeric["train"][~val_mask], labels["train"][~val_mask]),
    "val": (codes["train"][val_mask], numeric["train"][val_mask], labels["train"][val_mask]),
    "test": (codes["test"], numeric["test"], labels["test"]),
  }

  # Categorical encoding: vocabulary of the (post-split) training rows,
  # ids 1..K in sorted string order, 0 for anything unseen.
  fit_codes = parts["train"][0]
  lookups, cardinalities = [], []
  for j in _FEATURE_CAT_COLS:
    k = _RAW_CAT_COLS.index(j)
    vocab = raw.vocab[k]
    seen = np.zeros(len(vocab), dtype=bool)
    seen[fit_codes[:, k]] = True
    order = np.argsort(vocab, kind="stable")  # defensive: vocabularies are stored sorted
    lookup = np.zeros(len(vocab), dtype=np.int32)
    seen_sorted = order[seen[order]]
    lookup[seen_sorted] = np.arange(1, len(seen_sorted) + 1, dtype=np.int32)
    lookups.append((k, lookup))
    cardinalities.append(len(seen_sorted) + 1)

  def encode_cat(c: np.ndarray) -> np.ndarray:
    out = np.empty((c.shape[0], len(lookups)), dtype=np.int32)
    for i, (k, lookup) in enumerate(lookups):
      out[:, i] = lookup[c[:, k]] if len(lookup) else 0
    return out

  def transform_num(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).copy()
    if log1p_money:
      for j in _MONEY_COLS:
        i = _NUM_COLS.index(j)
        x[:, i] = np.log1p(np.maximum(x[:, i], 0.0))
    return x

  fit_num = transform_num(parts["train"][1])
  if fit_num.shape[0]:
    mean, std = fit_num.mean(axis=0), fit_num.std(axis=0)
  else:
    mean, std = np.zeros(len(_NUM_COLS)), np.ones(len(_NUM_COLS))
  std = np.where(std > 0, std, 1.0)

  splits = {
    name: Split(
      cat=encode_cat(c),
      num=((transform_num(x) - mean) / std).astype(np.float32),
      labels=y.astype(np.float32),
    )
    for name, (c, x, y) in parts.items()
  }
  return CensusIncome(
    train=splits["train"],
    val=splits["val"],
    test=splits["test"],
    cardinalities=tuple(int(c) for c in cardinalities),
    task_names=TASK_NAMES,
    cat_names=tuple(COLUMN_NAMES[j] for j in _FEATURE_CAT_COLS),
    num_names=tuple(COLUMN_NAMES[j] for j in _NUM_COLS),
    num_mean=mean.astype(np.float32),
    num_std=std.astype(np.float32),
  )


def _bundled_file():
  """The bundled npz as an ``importlib.resources`` Traversable (or a Path)."""
  try:
    resource = importlib.resources.files("gradcraft_jax").joinpath("data").joinpath(_BUNDLED)
    if resource.is_file():
      return resource
  except (TypeError, NotADirectoryError, ModuleNotFoundError):  # e.g. namespace-package edge cases
    pass
  return pathlib.Path(__file__).resolve().parent.parent / "data" / _BUNDLED


def load_census_income(
  path: str | os.PathLike | None = None,
  *,
  val_fraction: float = 0.2,
  seed: int = 0,
  max_rows: int | None = None,
  log1p_money: bool = True,
) -> CensusIncome:
  """Loads the Census-Income (KDD) data set as a 3-task problem.

  Args:
    path: ``None`` for the compact copy bundled with the package
      (``gradcraft_jax/data/census_income.npz``, all 299,285 rows); a
      directory holding the original UCI files ``census-income.data[.gz]``
      and ``census-income.test[.gz]`` (gzipped or plain text); or a ``.npz``
      file written by :func:`write_compact_npz`.
    val_fraction: fraction of the UCI training file held out as the
      validation split, stratified on the joint label pattern.
    seed: seed of the subsampling and of the validation split.
    max_rows: if given, each UCI file (train, test) is first subsampled
      uniformly (fixed ``seed``) to at most this many rows, for quick runs.
    log1p_money: apply ``log1p`` to wage per hour, capital gains, capital
      losses and dividends before standardising.

  Returns:
    A :class:`CensusIncome` whose splits have ``cat`` int32 ``(n, 31)``,
    ``num`` float32 ``(n, 7)`` and ``labels`` float32 ``(n, 3)`` in
    ``("income", "never_married", "education")`` order.  With the defaults the
    splits have 159,620 / 39,903 / 99,762 rows.

  Examples:
    >>> data = load_census_income(max_rows=1000)  # 1000 rows of each UCI file
    >>> data.train.num_examples + data.val.num_examples, data.test.num_examples
    (1000, 1000)
    >>> data.train.cat.shape[1], data.train.num.shape[1], data.train.labels.shape[1]
    (31, 7, 3)
  """
  if path is None:
    with _bundled_file().open("rb") as fh:
      raw = _raw_from_npz(fh)
  else:
    path = os.fspath(path)
    if os.path.isdir(path):
      raw = _raw_from_uci_dir(path)
    elif os.path.isfile(path):
      raw = _raw_from_npz(path)
    else:
      raise FileNotFoundError(path)
  return _preprocess(
    raw, val_fraction=val_fraction, seed=seed, max_rows=max_rows, log1p_money=log1p_money
  )


def iterate_batches(
  split: Split | Mapping[str, np.ndarray],
  batch_size: int,
  *,
  seed: int | np.random.Generator | None = 0,
  shuffle: bool = True,
  drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over one split in mini-batches (one epoch).

  Args:
    split: a :class:`Split` or a mapping with ``"cat"``, ``"num"``, ``"labels"``
      (any other same-length arrays in a mapping are batched too).
    batch_size: rows per batch.
    seed: seed or ``np.random.Generator`` of the shuffling (ignored when
      ``shuffle=False``); pass a ``Generator`` to get a new order every epoch.
    shuffle: shuffle the rows before batching.
    drop_remainder: drop the last, smaller batch (gives fixed shapes, which
      avoids re-compiling jitted steps).

  Yields:
    Dicts of numpy arrays ``{"cat": (b, n_cat), "num": (b, n_num), "labels": (b, 3)}``
    with ``b == batch_size`` except possibly for the last batch.

  Examples:
    >>> import numpy as np
    >>> rows = {"x": np.arange(10)}
    >>> [len(b["x"]) for b in iterate_batches(rows, 4)]
    [4, 4, 2]
    >>> [len(b["x"]) for b in iterate_batches(rows, 4, drop_remainder=True)]
    [4, 4]
    >>> sorted(np.concatenate([b["x"] for b in iterate_batches(rows, 4)]).tolist()) == list(range(10))
    True
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  arrays = split.as_dict() if isinstance(split, Split) else dict(split)
  n = len(next(iter(arrays.values())))
  if shuffle:
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    order = rng.permutation(n)
  else:
    order = np.arange(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield {k: v[idx] for k, v in arrays.items()}
