"""Tables: per-task test AUC, AV-A, RI-A, the paired comparison against
equal weighting, and the conflict diagnostics.

* AV-A: mean test AUC over the tasks.
* RI-A: mean over tasks of ``(AUC - AUC_single) / AUC_single`` in %, where
  ``AUC_single`` is the single-task model of the same seed.
* Paired comparison (``stats.compare_to_reference``): for each seed where
  both ran, ``AV-A(method) - AV-A(equal weighting)`` (same initial
  parameters and batch order); the mean and sample std of that difference,
  its 95% t-interval, the seeds won, Holm's adjusted p-value over the
  entries compared on the backbone, the interval at Holm's level and the
  decision (``better``/``worse`` only where it excludes zero, else ``tie``).
  Fields ``dEW_<field>`` (``wins`` and ``n_pair`` also without prefix).
* Standard deviations are sample standard deviations (``ddof = 1``).
* Tuning: the trials of each entry, its selected setting and the
  validation margin between the best and the second-best trial.
* Diagnostics: fraction of training steps where at least one pair of task
  gradients has a negative cosine, and the 5 / 50 / 95 % quantiles of all
  pairwise cosines over training (all seeds pooled), on all parameters and
  on the shared parameters only.

Numbers are joined to their ``±`` by non-breaking spaces (U+00A0), so a
rendered table never breaks ``0.9422 ± 0.0002`` over two lines.
"""

from __future__ import annotations

import math

import numpy as np
import stats
import tuning

SINGLE = "single_task"
EW = "mean"
NB = "\u00a0"  # non-breaking space
PM = f"{NB}±{NB}"


def _std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def chosen_text(record: dict | None) -> str:
  """``lr 0.003; tau=0.5, eps=0`` (one learning rate per task for the single-task models)."""
  chosen = (record or {}).get("chosen")
  if not chosen:
    return "-"
  lr = chosen["lr"]
  text = "lr " + ("/".join(f"{x:g}" for x in lr) if isinstance(lr, list) else f"{lr:g}")
  hp = tuning.describe(chosen.get("hparams", {}))
  return text if hp == "-" else f"{text}; {hp}"


def _fmt(mean, std, n, digits=4, sign=False):
  if n == 0 or not np.isfinite(mean):
    return "-"
  f = f"{{:{'+' if sign else ''}.{digits}f}}"
  return f.format(mean) + (f"{PM}{std:.{digits}f}" if n > 1 else "")


def _diag(runs: dict, key: str):
  """(fraction of steps with a conflict (mean over seeds), pooled cosines)."""
  fr, pooled = [], []
  for r in runs.values():
    c = getattr(r, key, None)
    if c is None or not len(c):
      continue
    fr.append(float(np.mean(np.any(c < 0, axis=1))))
    pooled.append(c.ravel())
  if not fr:
    return np.nan, None
  return float(np.mean(fr)), np.concatenate(pooled)


def _ava_by_seed(runs) -> dict:
  if not isinstance(runs, dict):
    return {}
  return {s: float(np.mean(r.test_auc)) for s, r in runs.items() if r.status == "ok"}


def summarise(
  results: dict, order: list, task_names, records: dict | None = None, alpha: float = 0.05
) -> list[dict]:
  """One row per entry of ``order`` (see the module docstring). ``records``:
  entry -> tuning record (``trials``, ``chosen``, ``margin``)."""
  T = len(task_names)
  single = results.get(SINGLE)
  ew = results.get(EW)
  records = records or {}
  paired = {}
  if isinstance(ew, dict):
    values = {m: _ava_by_seed(results.get(m)) for m in order}
    compared = [m for m in order if m != EW]
    paired = {
      c.method: c for c in stats.compare_to_reference(values, EW, alpha=alpha, methods=compared)
    }
  rows = []
  for name in order:
    runs = results.get(name)
    row = {"method": name, "n_ok": 0, "n_seeds": 0, "n_ri": 0, "n_pair": 0, "note": ""}
    if isinstance(runs, str) or runs is None:  # skipped, missing or a build error
      row["note"] = runs or "not run"
      rows.append(row)
      continue
    row["n_seeds"] = len(runs)
    ok = {s: r for s, r in runs.items() if r.status == "ok"}
    row["note"] = "; ".join(f"seed {s}: {r.status}" for s, r in runs.items() if r.status != "ok")
    row["n_ok"] = len(ok)
    rec = records.get(name)
    if rec:
      row["trials"] = len(rec.get("trials", []))
      row["chosen"] = chosen_text(rec)
      row["margin"] = rec.get("margin", math.nan)
      n = row["trials"]
      tune = f"{row['chosen']} ({n} trial{'s' if n != 1 else ''}"
      if np.isfinite(row["margin"]):
        tune += f", margin {row['margin']:.4f}"
      row["note"] = tune + ")" + ("; " + row["note"] if row["note"] else "")
    aucs = np.array([ok[s].test_auc for s in ok]).reshape(-1, T)
    for t, tn in enumerate(task_names):
      row[f"{tn}_mean"] = float(np.mean(aucs[:, t])) if ok else np.nan
      row[f"{tn}_std"] = _std(aucs[:, t]) if ok else np.nan
    ava = {s: float(np.mean(ok[s].test_auc)) for s in ok}
    row["AV-A_mean"] = float(np.mean(list(ava.values()))) if ok else np.nan
    row["AV-A_std"] = _std(list(ava.values())) if ok else np.nan
    ri = [
      100 * np.mean((ok[s].test_auc - single[s].test_auc) / single[s].test_auc)
      for s in ok
      if isinstance(single, dict) and s in single and single[s].status == "ok"
    ]
    row["RI-A_mean"] = float(np.mean(ri)) if ri else np.nan
    row["RI-A_std"] = _std(ri) if ri else np.nan
    row["n_ri"] = len(ri)
    c = paired.get(name)
    if c is not None and c.n:
      for f, v in c.as_dict().items():
        if f != "method":
          row[f"dEW_{f}"] = v
      row["n_pair"], row["wins"] = c.n, c.wins
    for key, label in (("cos_all", "all"), ("cos_shared", "shared")):
      frac, pooled = _diag(ok, key)
      row[f"conflict_{label}"] = frac
      for q in (5, 50, 95):
        row[f"cos{q}_{label}"] = float(np.percentile(pooled, q)) if pooled is not None else np.nan
    row["steps"] = float(np.mean([r.steps for r in ok.values()])) if ok else np.nan
    row["wall_s"] = float(sum(r.wall_s for r in runs.values()))
    rows.append(row)
  return rows


def table_markdown(rows, task_names) -> str:
  """The main table: per-task AUC, AV-A, RI-A, paired comparison with EW."""
  keys = list(task_names) + ["AV-A", "RI-A"]
  cols = list(task_names) + ["AV-A", "RI-A (%)", "ΔAV-A vs EW [Holm interval] (seeds won)"]
  best = {}
  for k in keys:  # best among the multi-task methods (not the reference)
    vals = [r.get(f"{k}_mean", np.nan) for r in rows if r["method"] != SINGLE]
    vals = [v for v in vals if np.isfinite(v)]
    best[k] = max(vals) if vals else None
  lines = [
    "| Method | " + " | ".join(cols) + " | Notes |",
    "|---|" + "---:|" * len(cols) + "---|",
  ]
  for r in rows:
    cells = []
    for k in keys:
      m = r.get(f"{k}_mean", np.nan)
      if k == "RI-A" and r["method"] == SINGLE:
        cells.append("0 (reference)" if r["n_ok"] else "-")
        continue
      if k == "RI-A":
        cell = _fmt(m, r.get("RI-A_std", np.nan), r["n_ri"], digits=3, sign=True)
      else:
        cell = _fmt(m, r.get(f"{k}_std", np.nan), r["n_ok"])
      if r["method"] != SINGLE and best[k] is not None and np.isfinite(m) and m == best[k]:
        cell = f"**{cell}**"
      cells.append(cell)
    if r["method"] == EW:
      cells.append("(reference)" if r["n_ok"] else "")
    elif r["n_pair"]:
      cells.append(paired_cell(r))
    else:
      cells.append("-")
    note = r["note"]
    if r["n_seeds"] and r["n_ok"] < r["n_seeds"]:
      note = f"{r['n_ok']}/{r['n_seeds']} seeds ok; " + note
    lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {note.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


def not_run_markdown(names, num_values: int, reason: str) -> str:
  """Rows of the main table for the entries a run left out, with the reason."""
  return "".join(f"| {n} | " + " | ".join(["-"] * num_values) + f" | {reason} |\n" for n in names)


def paired_cell(r: dict, digits: int = 4) -> str:
  """``+0.0005 [+0.0001, +0.0009] (3/3) better``."""
  lo, hi = r.get("dEW_ci_holm_low", math.nan), r.get("dEW_ci_holm_high", math.nan)
  ci = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if np.isfinite(lo) else ""
  dec = r.get("dEW_decision", "n/a")
  dec = f"**{dec}**" if dec in ("better", "worse") else dec
  return f"{r['dEW_mean']:+.{digits}f}{ci} ({r['wins']}/{r['n_pair']}){NB}{dec}"


def diagnostics_markdown(rows) -> str:
  """Conflict diagnostics per method (all parameters / shared parameters)."""
  lines = [
    "| Method | steps with a conflict: all | shared | cosine 5% / 50% / 95%: all | shared |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["method"] == SINGLE or not np.isfinite(r.get("conflict_all", np.nan)):
      continue
    cells = []
    for label in ("all", "shared"):
      cells.append(f"{100 * r[f'conflict_{label}']:.0f}{NB}%")
    for label in ("all", "shared"):
      q = [r[f"cos{q}_{label}"] for q in (5, 50, 95)]
      cells.append(f"{NB}/{NB}".join(f"{v:+.2f}" for v in q))
    lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


CSV_EXTRA = [
  "dEW_mean",
  "dEW_std",
  "wins",
  "n_pair",
  "dEW_ci95_low",
  "dEW_ci95_high",
  "dEW_p",
  "dEW_p_holm",
  "dEW_ci_holm_low",
  "dEW_ci_holm_high",
  "dEW_decision",
  "dEW_losses",
  "dEW_ties",
  "dEW_m",
  "trials",
  "chosen",
  "margin",
  "conflict_all",
  "conflict_shared",
  "cos5_all",
  "cos50_all",
  "cos95_all",
  "cos5_shared",
  "cos50_shared",
  "cos95_shared",
  "steps",
  "wall_s",
]


def table_csv(rows, task_names, backbone=None) -> str:
  keys = [f"{t}_{s}" for t in list(task_names) + ["AV-A", "RI-A"] for s in ("mean", "std")]
  head = ["backbone", "method", "n_ok", "n_seeds"] + keys + CSV_EXTRA + ["note"]
  out = [",".join(head)]
  for r in rows:
    vals = [backbone or "", r["method"], str(r["n_ok"]), str(r["n_seeds"])]
    for k in keys + CSV_EXTRA:
      v = r.get(k, np.nan)
      if isinstance(v, str):
        vals.append('"' + v.replace('"', "'") + '"')
      else:
        vals.append("" if not np.isfinite(v) else f"{v:.6g}")
    vals.append('"' + r["note"].replace('"', "'") + '"')
    out.append(",".join(vals))
  return "\n".join(out) + "\n"


def trials_markdown(records: dict, order: list) -> str:
  """Every tuning trial's validation score (seed 0); bold: chosen."""
  lines = [
    "| Entry | lr | hyperparameters | validation | status |",
    "|---|---:|---|---:|---|",
  ]
  for name in order:
    rec = records.get(name)
    if not rec:
      continue
    for t in rec["trials"]:
      v = t["val_AV-A"]
      hp = f"task {t['task']}" if "task" in t else tuning.describe(t.get("hparams", {}))
      cell = f"{v:.5f}" if np.isfinite(v) else "-"
      if t.get("chosen"):
        cell = f"**{cell}**"
      lines.append(f"| {name} | {t['lr']:g} | {hp} | {cell} | {t['status']} |")
  return "\n".join(lines) + "\n"
