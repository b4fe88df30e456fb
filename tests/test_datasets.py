"""Tests of gradcraft_jax.datasets (Census-Income loader and batching)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from gradcraft_jax.datasets import (
  TASK_NAMES,
  census,
  iterate_batches,
  load_census_income,
  write_compact_npz,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
BUNDLED = REPO / "gradcraft_jax" / "data" / "census_income.npz"


# --------------------------------------------------------------------------
# The bundled copy.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
  return load_census_income()


def test_bundled_file_is_small_and_attributed():
  assert BUNDLED.is_file()
  assert BUNDLED.stat().st_size <= 6 * 2**20
  with np.load(BUNDLED, allow_pickle=False) as z:
    lic = str(z["license"])
    assert "Kohavi" in lic and "Lane" in lic and "CC BY 4.0" in lic
    assert z["train_codes"].shape == (199_523, 34)
    assert z["test_codes"].shape == (99_762, 34)
    assert z["train_codes"].dtype == np.uint8


def test_bundled_shapes_and_dtypes(bundled):
  d = bundled
  n_cat, n_num = len(d.cat_names), len(d.num_names)
  assert (n_cat, n_num) == (31, 7)
  assert len(d.cardinalities) == n_cat
  assert d.task_names == TASK_NAMES == ("income", "never_married", "education")
  assert d.train.num_examples + d.val.num_examples == 199_523
  assert d.test.num_examples == 99_762
  assert abs(d.val.num_examples / 199_523 - 0.2) < 1e-3
  for split in (d.train, d.val, d.test):
    n = split.num_examples
    assert split.cat.shape == (n, n_cat) and split.cat.dtype == np.int32
    assert split.num.shape == (n, n_num) and split.num.dtype == np.float32
    assert split.labels.shape == (n, 3) and split.labels.dtype == np.float32
    assert set(np.unique(split.labels)) <= {0.0, 1.0}
    assert split.cat.min() >= 0
    assert np.all(split.cat < np.asarray(d.cardinalities))
    assert np.isfinite(split.num).all()
  # Every training value is in the vocabulary (no OOV ids in train).
  assert d.train.cat.min() >= 1
  np.testing.assert_allclose(d.train.num.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(d.train.num.std(0), 1.0, atol=1e-3)


def test_bundled_label_rates(bundled):
  for split in (bundled.train, bundled.val, bundled.test):
    income, never_married, education = split.labels.mean(0)
    assert 0.055 < income < 0.07
    assert 0.41 < never_married < 0.45
    assert 0.13 < education < 0.16
  # Stratified validation split: rates match the training split closely.
  np.testing.assert_allclose(bundled.val.labels.mean(0), bundled.train.labels.mean(0), atol=1e-3)


def test_no_label_leakage(bundled):
  features = set(bundled.cat_names) | set(bundled.num_names)
  for leaked in ("income", "marital_stat", "education", "instance_weight"):
    assert leaked not in features
  assert len(features) == 42 - 4
  assert "age" in bundled.num_names and "year" in bundled.cat_names
  assert "detailed_industry_recode" in bundled.cat_names


def test_max_rows_and_seed():
  a = load_census_income(max_rows=3000, seed=1)
  b = load_census_income(max_rows=3000, seed=1)
  c = load_census_income(max_rows=3000, seed=2)
  assert a.train.num_examples + a.val.num_examples == 3000
  assert a.test.num_examples == 3000
  np.testing.assert_array_equal(a.train.cat, b.train.cat)
  np.testing.assert_array_equal(a.val.num, b.val.num)
  assert not np.array_equal(a.val.num, c.val.num)


# --------------------------------------------------------------------------
# The original-format path on a tiny synthetic file.
# --------------------------------------------------------------------------

_EDUCATION = [
  "High school graduate",
  "Children",
  "Bachelors degree(BA AB BS)",
  "Masters degree(MA MS MEng MEd MSW MBA)",
  "Doctorate degree(PhD EdD)",
  "Prof school degree (MD DDS DVM LLB JD)",
  "Some college but no degree",
]
_MARITAL = ["Never married", "Married-civilian spouse present", "Divorced", "Widowed"]
_CITIZEN = ["Native- Born in the United States", "Foreign born- Not a citizen of U S "]


def _synthetic_rows(rng: np.random.Generator, n: int, extra_value: bool = False) -> list[list[str]]:
  rows = []
  for i in range(n):
    row = []
    for j in range(42):
      if j in census._NUM_COLS:
        high = {0: 91, 30: 7, 39: 53}.get(j, 5000)
        v = int(rng.integers(0, high)) if (j in (0, 30, 39) or rng.random() < 0.3) else 0
        row.append(str(v))
      elif j == 24:
        row.append(f"{rng.uniform(100, 5000):.2f}")
      elif j == 4:
        row.append(_EDUCATION[rng.integers(len(_EDUCATION))])
      elif j == 7:
        row.append(_MARITAL[rng.integers(len(_MARITAL))])
      elif j == 41:
        row.append("50000+." if rng.random() < 0.3 else "- 50000.")
      elif j == 35:
        row.append(_CITIZEN[rng.integers(2)])
      elif j in (2, 3, 40):
        row.append(str(int(rng.integers(0, 4)) + (94 if j == 40 else 0)))
      else:
        row.append(f"Value {j} {chr(65 + int(rng.integers(0, 3)))}")
    if extra_value and i == 0:
      row[1] = "Only in the test file"
    rows.append(row)
  return rows


def _write_uci(path: pathlib.Path, rows: list[list[str]], *, gz: bool) -> None:
  # UCI formatting: ", " separators, so every field but the first has a leading space.
  text = "".join(", ".join(r) + "\n" for r in rows)
  if gz:
    with gzip.open(str(path) + ".gz", "wt") as fh:
      fh.write(text)
  else:
    path.write_text(text)


@pytest.fixture()
def tiny_dir(tmp_path):
  rng = np.random.default_rng(123)
  train, test = _synthetic_rows(rng, 60), _synthetic_rows(rng, 25, extra_value=True)
  _write_uci(tmp_path / "census-income.data", train, gz=True)
  _write_uci(tmp_path / "census-income.test", test, gz=False)
  return tmp_path, train, test


def _expected_labels(rows):
  bachelor_plus = {_EDUCATION[i] for i in (2, 3, 4, 5)}
  return np.asarray(
    [[r[41] == "50000+.", r[7] == "Never married", r[4] in bachelor_plus] for r in rows],
    dtype=np.float32,
  )


def test_original_format_path(tiny_dir):
  directory, train_rows, test_rows = tiny_dir
  d = load_census_income(directory, val_fraction=0.25, seed=3)
  assert d.train.num_examples + d.val.num_examples == 60
  assert d.test.num_examples == 25
  assert d.train.cat.shape[1] == 31 and d.train.num.shape[1] == 7

  # Test split keeps the file order: labels derived from the raw strings.
  np.testing.assert_array_equal(d.test.labels, _expected_labels(test_rows))

  # Train + val together hold exactly the training rows' labels.
  got = np.concatenate([d.train.labels, d.val.labels])
  exp = _expected_labels(train_rows)
  np.testing.assert_array_equal(
    np.sort(got.view(np.void(12)), axis=0), np.sort(exp.view(np.void(12)), axis=0)
  )

  # Categorical encoding: ids 1..K in sorted order of the training vocabulary, 0 = OOV.
  # (val_fraction=0 so that the vocabulary comes from all training rows.)
  full = load_census_income(directory, val_fraction=0.0)
  assert full.val.num_examples == 0 and full.val.cat.shape == (0, 31)
  col = full.cat_names.index("class_of_worker")  # raw column 1
  vocab = sorted({r[1] for r in train_rows})
  assert full.cardinalities[col] == len(vocab) + 1
  np.testing.assert_array_equal(full.train.cat[:, col], [vocab.index(r[1]) + 1 for r in train_rows])
  expected = [vocab.index(r[1]) + 1 if r[1] in vocab else 0 for r in test_rows]
  assert expected[0] == 0  # "Only in the test file"
  np.testing.assert_array_equal(full.test.cat[:, col], expected)
  year = full.cat_names.index("year")
  np.testing.assert_array_equal(
    full.train.cat[:, year],
    [sorted({r[40] for r in train_rows}).index(r[40]) + 1 for r in train_rows],
  )

  # Citizenship value with a trailing space is parsed (stripped) consistently.
  cit = d.cat_names.index("citizenship")
  assert set(np.unique(d.test.cat[:, cit])) <= {1, 2}

  # Numeric: standardised with the training part's statistics (after log1p of money columns).
  age = d.num_names.index("age")
  raw_test_age = np.asarray([float(r[0]) for r in test_rows])
  np.testing.assert_allclose(
    d.test.num[:, age], (raw_test_age - d.num_mean[age]) / d.num_std[age], rtol=1e-5, atol=1e-5
  )
  gains = d.num_names.index("capital_gains")
  raw_test_gains = np.log1p(np.asarray([float(r[16]) for r in test_rows]))
  np.testing.assert_allclose(
    d.test.num[:, gains],
    (raw_test_gains - d.num_mean[gains]) / d.num_std[gains],
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(d.train.num.mean(0), 0.0, atol=1e-5)


def test_original_and_npz_paths_agree(tiny_dir, tmp_path):
  directory, _, _ = tiny_dir
  out = tmp_path / "tiny.npz"
  arrays = write_compact_npz(directory, out)
  assert arrays["train_codes"].shape == (60, 34)
  for kwargs in ({}, {"seed": 5, "val_fraction": 0.3}, {"max_rows": 20, "seed": 1}):
    a = load_census_income(directory, **kwargs)
    b = load_census_income(out, **kwargs)
    assert a.cardinalities == b.cardinalities
    assert a.cat_names == b.cat_names and a.num_names == b.num_names
    for name in ("train", "val", "test"):
      for field in ("cat", "num", "labels"):
        np.testing.assert_array_equal(
          getattr(getattr(a, name), field), getattr(getattr(b, name), field)
        )


def test_make_script_builds_same_npz(tiny_dir, tmp_path):
  directory, _, _ = tiny_dir
  spec = importlib.util.spec_from_file_location(
    "make_census_npz", REPO / "scripts" / "make_census_npz.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "script.npz"
  assert module.main([os.fspath(directory), os.fspath(out)]) == 0
  a, b = load_census_income(out), load_census_income(directory)
  np.testing.assert_array_equal(a.train.cat, b.train.cat)
  np.testing.assert_array_equal(a.test.num, b.test.num)


def test_bad_row_length(tmp_path):
  (tmp_path / "census-income.data").write_text("1, 2, 3\n")
  (tmp_path / "census-income.test").write_text("1, 2, 3\n")
  with pytest.raises(ValueError, match="expected 42 fields"):
    load_census_income(tmp_path)


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


def test_iterate_batches():
  n = 103
  split = census.Split(
    cat=np.arange(n * 2, dtype=np.int32).reshape(n, 2),
    num=np.arange(n, dtype=np.float32)[:, None],
    labels=np.zeros((n, 3), np.float32),
  )
  batches = list(iterate_batches(split, 10, seed=0))
  assert len(batches) == 11 and batches[-1]["cat"].shape == (3, 2)
  seen = np.concatenate([b["num"][:, 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))
  assert not np.array_equal(seen, np.arange(n))
  for b in batches:  # rows stay aligned across fields
    np.testing.assert_array_equal(b["cat"][:, 0], 2 * b["num"][:, 0])

  again = np.concatenate([b["num"][:, 0] for b in iterate_batches(split, 10, seed=0)])
  np.testing.assert_array_equal(seen, again)

  dropped = list(iterate_batches(split, 10, seed=np.random.default_rng(1), drop_remainder=True))
  assert len(dropped) == 10 and all(b["labels"].shape == (10, 3) for b in dropped)

  ordered = list(iterate_batches(split.as_dict(), 50, shuffle=False))
  np.testing.assert_array_equal(ordered[0]["num"][:, 0], np.arange(50))
  with pytest.raises(ValueError):
    next(iterate_batches(split, 0))
