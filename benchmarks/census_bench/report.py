"""Tables: per-task test AUC, AV-A, RI-A, the paired comparison against
equal weighting, and the conflict diagnostics.

* AV-A: mean test AUC over the tasks.
* RI-A: mean over tasks of ``(AUC - AUC_single) / AUC_single`` in %, where
  ``AUC_single`` is the single-task model of the same seed.
* Paired comparison: for each seed where both ran, ``AV-A(method) -
  AV-A(equal weighting)`` (same initial parameters and batch order); mean
  ± std of that difference and the number of seeds where it is positive.
* Diagnostics: fraction of training steps where at least one pair of task
  gradients has a negative cosine, and the 5 / 50 / 95 % quantiles of all
  pairwise cosines over training (all seeds pooled), on all parameters and
  on the shared parameters only.

Numbers are joined to their ``±`` by non-breaking spaces (U+00A0), so a
rendered table never breaks ``0.9422 ± 0.0002`` over two lines.
"""

from __future__ import annotations

import numpy as np

SINGLE = "single_task"
EW = "mean"
NB = "\u00a0"  # non-breaking space
PM = f"{NB}±{NB}"


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


def summarise(results: dict, order: list, task_names) -> list[dict]:
  """One row per entry of ``order`` (see the module docstring)."""
  T = len(task_names)
  single = results.get(SINGLE)
  ew = results.get(EW)
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
    if "tau" in next(iter(runs.values())).extra:
      r0 = next(iter(runs.values()))
      hp = f"tau={r0.extra['tau']:g}, eps={r0.extra['eps']:g}"
      row["note"] = hp + ("; " + row["note"] if row["note"] else "")
    row["n_ok"] = len(ok)
    aucs = np.array([ok[s].test_auc for s in ok]).reshape(-1, T)
    for t, tn in enumerate(task_names):
      row[f"{tn}_mean"] = float(np.mean(aucs[:, t])) if ok else np.nan
      row[f"{tn}_std"] = float(np.std(aucs[:, t])) if ok else np.nan
    ava = {s: float(np.mean(ok[s].test_auc)) for s in ok}
    row["AV-A_mean"] = float(np.mean(list(ava.values()))) if ok else np.nan
    row["AV-A_std"] = float(np.std(list(ava.values()))) if ok else np.nan
    ri = [
      100 * np.mean((ok[s].test_auc - single[s].test_auc) / single[s].test_auc)
      for s in ok
      if isinstance(single, dict) and s in single and single[s].status == "ok"
    ]
    row["RI-A_mean"] = float(np.mean(ri)) if ri else np.nan
    row["RI-A_std"] = float(np.std(ri)) if ri else np.nan
    row["n_ri"] = len(ri)
    if name not in (SINGLE, EW) and isinstance(ew, dict):
      d = [ava[s] - float(np.mean(ew[s].test_auc)) for s in ok if s in ew and ew[s].status == "ok"]
      row["n_pair"] = len(d)
      row["dEW_mean"] = float(np.mean(d)) if d else np.nan
      row["dEW_std"] = float(np.std(d)) if d else np.nan
      row["wins"] = int(np.sum(np.asarray(d) > 0)) if d else 0
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
  cols = list(task_names) + ["AV-A", "RI-A (%)", "ΔAV-A vs EW (seeds won)"]
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
    if r["method"] in (SINGLE, EW):
      cells.append("(reference)" if r["method"] == EW and r["n_ok"] else "")
    elif r["n_pair"]:
      d = _fmt(r["dEW_mean"], r["dEW_std"], r["n_pair"], sign=True)
      cells.append(f"{d} ({r['wins']}/{r['n_pair']})")
    else:
      cells.append("-")
    note = r["note"]
    if r["n_seeds"] and r["n_ok"] < r["n_seeds"]:
      note = f"{r['n_ok']}/{r['n_seeds']} seeds ok; " + note
    lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {note.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


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
      vals.append("" if not np.isfinite(v) else f"{v:.6g}")
    vals.append('"' + r["note"].replace('"', "'") + '"')
    out.append(",".join(vals))
  return "\n".join(out) + "\n"


def grid_markdown(grid_rows, taus, epss, chosen) -> str:
  """Validation AV-A of each (tau, eps) of the grid (seed 0); bold: chosen."""
  lines = [
    "| tau \\ eps | " + " | ".join(f"{e:g}" for e in epss) + " |",
    "|---|" + "---:|" * len(epss),
  ]
  for tau in taus:
    cells = []
    for eps in epss:
      g = next((x for x in grid_rows if x["tau"] == tau and x["eps"] == eps), None)
      if g is None:
        cells.append("")
        continue
      c = f"{g['val_AV-A']:.5f}" if np.isfinite(g["val_AV-A"]) else g["status"]
      if chosen and (tau, eps) == (chosen["tau"], chosen["eps"]):
        c = f"**{c}**"
      cells.append(c)
    lines.append(f"| {tau:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
