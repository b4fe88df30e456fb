"""benchmarks/census_benchmark.py: the --quick smoke run and the pieces of its report."""

import csv
import json
import os
import sys

import numpy as np
import pytest
from script_runs import run_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "census_benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from census_bench import methods as M  # noqa: E402
from census_bench import report  # noqa: E402
from census_bench.training import RunResult, shared_leaf_mask  # noqa: E402


def _ok(auc, cos=None):
  a = np.asarray(auc, float)
  r = RunResult(status="ok", test_auc=a, val_auc=a, steps=10)
  if cos is not None:
    r.cos_all = np.asarray(cos, float)
    r.cos_shared = 2 * np.asarray(cos, float)
  return r


def test_summary_ri_paired_and_diagnostics_by_hand():
  results = {
    report.SINGLE: {0: _ok([0.8, 0.9]), 1: _ok([0.8, 0.9])},
    "mean": {0: _ok([0.88, 0.9], [[0.1], [-0.2]]), 1: _ok([0.8, 0.99], [[0.3], [0.2]])},
    "mgda": {
      0: RunResult(status="diverged: non-finite training loss at step 3"),
      1: _ok([0.9, 0.9], [[-0.1], [-0.1]]),
    },
    "gradcraft": {0: _ok([0.9, 0.9]), 1: _ok([0.8, 0.98])},
    "upgrad": "skipped: needs arguments method",
  }
  order = [report.SINGLE, "mean", "mgda", "gradcraft", "upgrad"]
  by = {r["method"]: r for r in report.summarise(results, order, ("a", "b"))}
  # RI-A: seed 0 (10% + 0%) / 2 = 5 %, seed 1 (0% + 10%) / 2 = 5 %.
  assert by["mean"]["RI-A_mean"] == pytest.approx(5.0)
  assert by["mean"]["AV-A_mean"] == pytest.approx(np.mean([0.89, 0.895]))
  # Paired with EW: seed 0 0.9 - 0.89 = +0.01 (win), seed 1 0.89 - 0.895 = -0.005.
  g = by["gradcraft"]
  assert g["dEW_mean"] == pytest.approx(np.mean([0.01, -0.005]))
  assert g["wins"] == 1 and g["n_pair"] == 2
  # Sample std 0.015 / sqrt(2); 95% interval with the published t_{0.975, 1} = 12.7062047.
  sd = 0.015 / np.sqrt(2)
  assert g["dEW_std"] == pytest.approx(sd)
  half = 12.7062047 * sd / np.sqrt(2)
  assert (g["dEW_ci95_low"], g["dEW_ci95_high"]) == pytest.approx((0.0025 - half, 0.0025 + half))
  assert g["dEW_decision"] == "tie" and g["dEW_m"] == 2  # mgda has one paired seed only
  assert by["single_task"]["n_pair"] == 2  # the single-task models are compared with EW too
  assert by["mgda"]["n_pair"] == 1 and by["mgda"]["wins"] == 1  # only seed 1 ran
  # Diagnostics: one of two steps conflicting in seed 0, none in seed 1 -> 25 %.
  assert by["mean"]["conflict_all"] == pytest.approx(0.25)
  assert by["mean"]["cos50_all"] == pytest.approx(np.percentile([0.1, -0.2, 0.3, 0.2], 50))
  assert by["mean"]["cos50_shared"] == pytest.approx(2 * by["mean"]["cos50_all"])
  assert by["mgda"]["n_ok"] == 1 and "diverged" in by["mgda"]["note"]
  assert by["upgrad"]["n_ok"] == 0 and "skipped" in by["upgrad"]["note"]
  rows = list(by.values())
  md = report.table_markdown(rows, ("a", "b"))
  assert "1/2 seeds ok" in md and "skipped" in md and "**" in md
  # AV-A of mean: 0.89 and 0.895, sample std 0.005 / sqrt(2).
  assert f"{0.8925:.4f}\u00a0±\u00a0{0.005 / np.sqrt(2):.4f}" in md  # non-breaking, never wrapped
  assert "(1/2)\u00a0tie" in md  # seeds won against EW, decision
  assert "25\u00a0%" in report.diagnostics_markdown(rows)
  assert report.table_csv(rows, ("a", "b"), backbone="x").count("\n") == 6


def test_method_enumeration():
  names = M.library_method_names()
  for m in ("mean", "mgda", "pcgrad", "gradcraft", "upgrad"):
    assert m in names
  assert names[-1] == "gradcraft" and "nmt" not in names
  assert not any(n.endswith("_weights") for n in names)
  import gradcraft_jax

  kw = M.factory_kwargs(gradcraft_jax.pcgrad, 3, 7)
  assert kw["seed"] == 7
  with pytest.raises(M.Skip, match="needs arguments"):
    M.factory_kwargs(lambda method, *, num_tasks: None, 3, 0)


def test_probe_tells_gram_methods_from_loss_only():
  import jax.numpy as jnp

  params = {"w": jnp.zeros(3)}
  assert M.probe(M.make_method("mgda", 2), params, 2)
  assert not M.probe(M.make_method("mean", 2), params, 2)


def test_every_library_method_can_be_built_and_run():
  """No method is skipped: CR-MOGM gets MGDA as its base, MoCo (its own
  transform, not a weighting) runs as is, MoDo and SDMGrad get a second
  batch; one update of each on stacked gradients is finite."""
  import jax
  import jax.numpy as jnp

  import gradcraft_jax

  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([[1.0, 0.5, -0.2], [-0.3, 1.0, 0.4], [0.2, -0.1, 1.0]])}
  losses = jnp.array([1.0, 2.0, 0.5])
  for name in M.library_method_names():
    tx = M.make_method(name, 3, 0)
    M.probe(tx, params, 3, name=name)  # no Skip
    extra = {"stacked_2": jax.tree.map(lambda x: 0.9 * x, g)} if name in M.SECOND_BATCH else {}
    upd, _ = tx.update(g, tx.init(params), params, task_losses=losses, **extra)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(upd)), name
  assert isinstance(M.factory_kwargs(gradcraft_jax.cr_mogm, 3, 0)["method"], tuple)
  assert not M.probe(M.make_method("moco", 3), params, 3, name="moco")


def test_shared_leaf_mask():
  import jax.numpy as jnp

  grads = {
    "bottom": jnp.array([[1.0, 0.0], [0.5, 0.0]]),  # both tasks
    "towers": jnp.array([[1.0, 0.0], [0.0, 2.0]]),  # one task per element
    "mixed": jnp.array([[1.0, 1.0], [1.0, 0.0]]),  # one element shared
  }
  assert shared_leaf_mask(grads) == {"bottom": True, "towers": False, "mixed": True}


# The smoke run trains a subset that covers every kind of method the script
# handles (loss-only, Gram weighting, crafting, a base method's argument,
# its own transform, a second batch; NMT and the single-task models are
# always on): every method's training is covered by
# test_every_library_method_can_be_built_and_run, and the full run by the
# README's main job.
QUICK_METHODS = ("mean", "uncertainty_weighting", "mgda", "cr_mogm", "moco", "modo", "gradcraft")


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
  out = tmp_path / "census"
  proc = run_quick(SCRIPT, out, "--methods", ",".join(QUICK_METHODS), "--shared-crafting")
  for f in ("table.md", "table.csv", "results.json", "auc_by_method.png", "auc_effects.png"):
    assert (out / f).is_file() and (out / f).stat().st_size > 0, f
  assert (out / "curves.png").is_file() and (out / "grad_cosines.png").is_file()
  assert "\r" not in proc.stdout  # no progress bar in a log
  with open(out / "table.csv") as f:
    lines = f.readlines()
  meta = dict(ln[2:].rstrip("\n").split(": ", 1) for ln in lines if ln.startswith("# "))
  assert {"command", "date", "commit", "machine"} <= set(meta)
  csv_rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
  listed = [r["method"] for r in csv_rows]
  expected = [report.SINGLE, *QUICK_METHODS, "nmt"]
  for name in expected:
    assert name in listed, name
  assert "gradcraft (shared)" in listed and "mgda (shared)" in listed
  ok = [r for r in csv_rows if int(r["n_ok"]) > 0]
  assert {"single_task", "mean", "gradcraft", "gradcraft (shared)"} <= {r["method"] for r in ok}
  for r in ok:
    assert float(r["AV-A_mean"]) > 0.6, r
    if r["method"] != "single_task":
      assert 0 <= float(r["conflict_all"]) <= 1
  for r in csv_rows:  # a row that did not run says why
    if int(r["n_ok"]) == 0:
      assert r["note"].strip('"'), r
  md = (out / "table.md").read_text()
  assert "Tuning trials" in md and "Conflict diagnostics" in md and "Equal tuning budget" in md
  summary = json.loads((out / "results.json").read_text())
  tuned = summary["backbones"]["shared_bottom"]["tuning"]
  assert {"mean", "gradcraft", "gradcraft (shared)", "single_task", "nmt"} <= set(tuned)
  for name, rec in tuned.items():  # the same learning-rate grid for every entry
    assert {t["lr"] for t in rec["trials"]} == set(summary["config"]["lrs"]), name
  for r in csv_rows:
    if r["method"] not in ("mean",) and int(r["n_ok"]) > 0:
      assert r["dEW_decision"] in ("better", "worse", "tie", "n/a"), r
  assert "wall time" in proc.stdout


def _magnitude_factors(gram, tau):
  """GradCraft's step 1 written from the paper: s_i = tau max_j |g_j| / |g_i| + 1 - tau."""
  n = np.sqrt(np.diag(gram))
  return tau * n.max() / n + 1.0 - tau


@pytest.mark.parametrize("tau", [0.5, 0.1, 1.0])
def test_ablation_variants_are_gradcraft_parts(tau):
  """Magnitude only: the aligned gradients summed, no projection (weights
  s_i / T from a NumPy loop); direction only: GradCraft with tau = 0; with
  conflicting gradients both differ from the whole method."""
  import jax.numpy as jnp

  import gradcraft_jax

  g = np.array([[3.0, 0.5, -0.2], [-0.3, 1.0, 0.4], [0.2, -2.0, 0.1]], np.float32)
  stacked = {"w": jnp.asarray(g)}
  params = {"w": jnp.zeros(3)}
  gram = g.astype(np.float64) @ g.T.astype(np.float64)

  def update(tx):
    return np.asarray(tx.update(stacked, tx.init(params), params)[0]["w"])

  want = (_magnitude_factors(gram, tau)[:, None] * g).sum(0) / 3
  np.testing.assert_allclose(update(M.gradcraft_magnitude(tau=tau)), want, rtol=1e-5)
  direction = update(M.gradcraft_direction(eps=0.1))
  np.testing.assert_allclose(direction, update(gradcraft_jax.gradcraft(tau=0.0, eps=0.1)))
  whole = update(gradcraft_jax.gradcraft(tau=tau, eps=0.1))
  assert np.abs(whole - want).max() > 1e-3 and np.abs(whole - direction).max() > 1e-3


def test_ablation_plan():
  """--ablation: equal weighting, GradCraft and its two parts, whole model and
  shared-only, on every backbone; every other library method and NMT are
  listed as not run."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import census_benchmark as cb

  args, cfg = cb.parse_args(["--ablation"])
  plans = cb.make_plans(args, cfg)
  assert [p.backbone for p in plans] == list(cb.BACKBONES)
  parts = ("gradcraft", "gradcraft_magnitude", "gradcraft_direction")
  for p in plans:
    assert p.methods == ("mean", *parts) and p.shared == parts
    assert not p.single and not p.nmt
    assert set(p.not_run) | {"mean", "gradcraft"} == set(M.library_method_names()) | {"nmt"}
  for name in parts:
    assert len(cb.tuning.grid(name, cfg.lrs, cfg.trials)) == 2 * cfg.trials


@pytest.mark.slow
def test_quick_ablation_run(tmp_path):
  """--ablation --quick trains GradCraft's parts, whole model and shared-only."""
  out = tmp_path / "ablation"
  run_quick(SCRIPT, out, "--ablation")
  with open(out / "table.csv") as f:
    rows = list(csv.DictReader(ln for ln in f if not ln.startswith("#")))
  ok = {r["method"] for r in rows if int(r["n_ok"]) > 0}
  for name in ("gradcraft", "gradcraft_magnitude", "gradcraft_direction"):
    assert name in ok and f"{name} (shared)" in ok, (name, ok)
  md = (out / "table.md").read_text()
  assert "| mgda |" in md and "not in GradCraft's ablation" in md  # listed, not run
