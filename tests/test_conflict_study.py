"""benchmarks/conflict_study.py: the synthetic problems, the metric and the --quick run."""

import csv
import os
import sys

import numpy as np
import pytest
from script_runs import run_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "conflict_study.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import conflict_study as cs  # noqa: E402


def _cos(a, b):
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.0, -0.5, -0.9])
def test_two_task_cosine_is_rho(rho):
  w = cs.task_directions(2, rho, 16, np.random.default_rng(0))
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-12)
  assert _cos(w[0], w[1]) == pytest.approx(rho, abs=1e-12)


def test_group_structure_for_more_tasks():
  rho = -0.9
  w = cs.task_directions(4, rho, 16, np.random.default_rng(1))
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-12)
  assert _cos(w[0], w[1]) == pytest.approx(0.8, abs=1e-12)  # same group
  assert _cos(w[2], w[3]) == pytest.approx(0.8, abs=1e-12)
  assert _cos(w[0], w[2]) == pytest.approx(0.8 * rho, abs=1e-12)  # across groups


def test_problem_loss_scales():
  cfg = cs.Cfg(n_train=64, n_val=64, n_test=20000)
  _, _, (x, y), scales = cs.make_problem(4, 0.5, 1000.0, 0, cfg)
  assert x.shape == (20000, 16) and y.shape == (20000, 4)
  np.testing.assert_allclose(scales, np.logspace(0, 3, 4), rtol=1e-5)
  # Target variance grows with the scale: the ratio of the extremes is ~1000.
  var = y.var(axis=0)
  assert 500 < var[-1] / var[0] < 2000


def test_relative_is_geometric_mean_over_tasks_and_seeds():
  a = np.array([[[2.0, 8.0], [1.0, 1.0]]])  # (S=1, K=2, T=2)
  b = np.ones_like(a)
  mean, logstd, n = cs.relative(a, b)
  # Seed 0: log(4) (mean of log 2, log 8); seed 1: 0 -> mean log 2.
  assert mean[0] == pytest.approx(2.0) and n[0] == 2
  assert logstd[0] == pytest.approx(np.log(4) / 2)


@pytest.mark.slow
def test_quick_run_writes_table_and_figures(tmp_path):
  out = tmp_path / "conflict"
  run_quick(SCRIPT, out)
  for f in ("conflict_table.csv", "conflict_table.md", "conflict_vs_cosine.png"):
    assert (out / f).stat().st_size > 0, f
  assert (out / "conflict_vs_imbalance.png").stat().st_size > 0
  with open(out / "conflict_table.csv") as f:
    lines = [ln for ln in f if not ln.startswith("#")]
  rows = list(csv.DictReader(lines))
  methods = {r["method"] for r in rows}
  assert {"single_task", "mean", "gradcraft", "nmt", "mgda"} <= methods
  ew = [r for r in rows if r["method"] == "mean"]
  assert ew and all(float(r["rel_ew"]) == pytest.approx(1.0) for r in ew)
  for r in rows:
    if r["rel_ew"]:
      assert np.isfinite(float(r["rel_ew"])) and float(r["rel_ew"]) > 0
  assert {r["axis"] for r in rows} == {"conflict", "imbalance"}
  # Every entry, the reference included, records the learning rate it chose on validation.
  for r in rows:
    if r["method"] in ("mean", "gradcraft", "mgda", "nmt"):
      assert r["note"].startswith("lr "), r
    if r["method"] not in ("mean",) and r["rel_ew"]:
      assert r["decision"] in ("better", "worse", "tie")
      assert float(r["ci95_low"]) <= float(r["rel_ew"]) <= float(r["ci95_high"])
  single = [r for r in rows if r["method"] == "single_task"]
  assert all(len(r["note"].split("/")) == 2 for r in single)  # one rate per task (T = 2)
  assert "Tuning budget" in (out / "conflict_table.md").read_text()
  with open(out / "conflict_cosines.csv") as f:
    lines = [ln for ln in f if not ln.startswith("#")]
    cos = {(r["axis"], float(r["rho"]), float(r["ratio"])): r for r in csv.DictReader(lines)}
  assert (out / "conflict_cosines.png").stat().st_size > 0
  aligned, opposed = cos[("conflict", 1.0, 1.0)], cos[("conflict", -0.9, 1.0)]
  for r in cos.values():
    assert -1 <= float(r["q05"]) <= float(r["q50"]) <= float(r["q95"]) <= 1
  # The generator's knob moves the measured gradient cosines the same way.
  assert float(aligned["q50"]) > float(opposed["q50"])
  assert float(opposed["negative"]) > float(aligned["negative"])


def test_cosine_rows_by_hand():
  """Quantiles over steps, seeds and pairs; the two groups' pairs apart."""
  T = 4
  c = np.eye(T)
  c[0, 1] = c[1, 0] = c[2, 3] = c[3, 2] = 0.5  # within groups
  for i, j in ((0, 2), (0, 3), (1, 2), (1, 3)):
    c[i, j] = c[j, i] = -0.25  # across groups
  cos = np.broadcast_to(c, (1, 2, 3, T, T))  # (settings, seeds, steps, T, T)
  rows = cs.cosine_rows({T: ([("conflict", -0.5, 1.0)], None, None, None, cos)})
  by = {r["pairs"]: r for r in rows}
  assert by["within groups"]["q50"] == pytest.approx(0.5) and by["within groups"]["n"] == 12
  assert by["across groups"]["q95"] == pytest.approx(-0.25) and by["across groups"]["negative"] == 1
  assert by["all"]["n"] == 36 and by["all"]["negative"] == pytest.approx(4 / 6)


def test_summarise_is_the_paired_comparison_by_hand():
  """Ratios, intervals and seeds won from the per-seed mean log losses."""
  rng = np.random.default_rng(3)
  ew = np.exp(rng.normal(size=(1, 4, 2)))  # (settings, seeds, T)
  d = np.array([-0.3, -0.2, -0.25, -0.1])  # per-seed log ratio of "a" to equal weighting
  a = ew * np.exp(d)[None, :, None]
  b = ew * np.exp(np.array([0.1, -0.1, 0.05, -0.05]))[None, :, None]
  settings = [("conflict", 0.5, 1.0)]
  out = {"single_task": ew * 1.5, "mean": ew, "a": a, "b": b}
  rows = cs.summarise({2: (settings, out, None, {}, None)})
  by = {r["method"]: r for r in rows}
  assert by["mean"]["rel_ew"] == 1.0 and by["mean"]["decision"] == "reference"
  half = 3.182446305284263 * d.std(ddof=1) / 2  # t_{0.975, 3} s / sqrt(4)
  assert by["a"]["rel_ew"] == pytest.approx(np.exp(d.mean()))
  assert by["a"]["ci95_low"] == pytest.approx(np.exp(d.mean() - half))
  assert by["a"]["ci95_high"] == pytest.approx(np.exp(d.mean() + half))
  assert by["a"]["wins"] == 4 and by["a"]["n_seeds"] == 4
  assert by["a"]["decision"] == "better" and by["b"]["decision"] == "tie"
  assert by["a"]["rel_single"] == pytest.approx(np.exp(d.mean()) / 1.5)
