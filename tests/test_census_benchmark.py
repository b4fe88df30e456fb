"""End-to-end smoke test of benchmarks/census_benchmark.py --quick."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "census_benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
  import census_benchmark as cb

  out = tmp_path / "census"
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--quick", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for f in (
    "table.md",
    "table.csv",
    "results.json",
    "auc_by_method.png",
    "curves.png",
    "grad_cosines.png",
  ):
    assert (out / f).is_file() and (out / f).stat().st_size > 0, f
  expected = [cb.SINGLE, *cb.METHODS, cb.NMT]
  md = (out / "table.md").read_text()
  rows = [
    line.split("|")[1].strip()
    for line in md.splitlines()
    if line.startswith("| ") and not line.startswith("| Method") and not line.startswith("| tau")
  ]
  for name in expected:
    assert name in rows, (name, md)
  with open(out / "table.csv") as f:
    csv_rows = list(csv.DictReader(f))
  assert [r["method"] for r in csv_rows] == expected
  summary = json.loads((out / "results.json").read_text())
  for name in expected:
    runs = summary["runs"][name]
    if isinstance(runs, str):  # missing or failed to build: said so
      assert runs.startswith(("missing", "error")), runs
      continue
    for r in runs.values():
      assert r["status"] == "ok" or r["status"].startswith(("diverged", "error")), r["status"]
  # The methods that are present trained and beat chance on every task.
  ok = [r for r in csv_rows if int(r["n_ok"]) > 0]
  assert {"single_task", "mean", "gradcraft"} <= {r["method"] for r in ok}
  for r in ok:
    assert float(r["AV-A_mean"]) > 0.6, r
  assert "GradCraft grid" in md
  assert len(summary["grid"]) == len(cb.GRID_TAU) * len(cb.GRID_EPS)
  assert "wall time" in proc.stdout


def test_summary_reports_failures_and_ri():
  import census_benchmark as cb
  import numpy as np

  ok = lambda a: cb.RunResult(
    status="ok", test_auc=np.asarray(a, float), val_auc=np.asarray(a, float), steps=10
  )
  results = {
    cb.SINGLE: {0: ok([0.8, 0.9]), 1: ok([0.8, 0.9])},
    "mean": {0: ok([0.88, 0.9]), 1: ok([0.8, 0.99])},
    "mgda": {
      0: cb.RunResult(status="diverged: non-finite training loss at step 3"),
      1: ok([0.9, 0.9]),
    },
    "upgrad": "missing (not exported by gradcraft_jax yet)",
  }
  rows = cb.summarise(results, [cb.SINGLE, "mean", "mgda", "upgrad"], ("a", "b"))
  by = {r["method"]: r for r in rows}
  # RI-A by hand: seed 0 (10% + 0%) / 2 = 5%, seed 1 (0% + 10%) / 2 = 5%.
  assert by["mean"]["RI-A_mean"] == pytest.approx(5.0)
  assert by["mean"]["AV-A_mean"] == pytest.approx(np.mean([0.89, 0.895]))
  assert by["mgda"]["n_ok"] == 1 and "diverged" in by["mgda"]["note"]
  assert by["upgrad"]["n_ok"] == 0 and "missing" in by["upgrad"]["note"]
  md = cb.table_markdown(rows, ("a", "b"))
  assert "1/2 seeds ok" in md and "missing" in md
  assert "**" in md
  csv_text = cb.table_csv(rows, ("a", "b"))
  assert csv_text.count("\n") == 5
