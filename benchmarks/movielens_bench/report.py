"""Summary rows, paired statistics against equal weighting, Markdown and CSV.

Per entry and backbone, over the seeds that ran: the test metrics (mean and
standard deviation), the tuning record (trials, chosen setting, validation
margin between the best and the second-best trial), the conflict
diagnostics, and for each comparison metric the paired statistics against
equal weighting (``stats.compare_to_reference``; Holm over every entry
compared on that backbone).

Paired fields are ``d_<metric>_<field>`` (fields of
``stats.PairedComparison``: ``mean`` difference, ``ci95_low``, ...,
``decision``, ``wins``, ``m`` the Holm family size). Comparison metrics:
``dm`` (the multi-task summary, in %: the mean over the
three tasks of the relative difference to equal weighting of the same seed,
signed so that positive is better: ``+ dAUC / AUC`` for click and like, ``-
dRMSE / RMSE`` for the rating), ``click_auc``, ``like_auc``, ``rmse`` (lower
is better), ``hr`` and ``ndcg`` (HR@k and NDCG@k of the click ranking).
``dm_stl`` is the same summary against the single-task models of the same
seed (reported, not tested).
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import stats
import tuning

EW = "mean"
SINGLE = "single_task"
NMT = "nmt"
NB = "\u00a0"  # non-breaking space
PM = f"{NB}±{NB}"
METRIC_LABELS = {
  "dm": "Δm vs EW (%)",
  "click_auc": "click AUC",
  "like_auc": "like AUC",
  "rmse": "RMSE",
  "hr": "HR@10",
  "ndcg": "NDCG@10",
}
HIGHER_IS_BETTER = {"dm": True, "click_auc": True, "like_auc": True, "rmse": False}
HIGHER_IS_BETTER.update(hr=True, ndcg=True)
COMPARED = ("dm", "click_auc", "like_auc", "rmse", "hr", "ndcg")
TEST_METRICS = ("click_auc", "like_auc", "rmse", "hr", "ndcg")


def delta_m(m: dict, ref: dict) -> float:
  """Multi-task relative difference of metrics ``m`` to ``ref``, in % (positive: better)."""
  parts = [
    (m["click_auc"] - ref["click_auc"]) / ref["click_auc"],
    (m["like_auc"] - ref["like_auc"]) / ref["like_auc"],
    -(m["rmse"] - ref["rmse"]) / ref["rmse"],
  ]
  return 100.0 * float(np.mean(parts))


def _ok_runs(entry) -> dict:
  if not isinstance(entry, dict):
    return {}
  return {s: r for s, r in entry["runs"].items() if r.status == "ok" and r.test is not None}


def _diag(runs: dict):
  fr, pooled = [], []
  for r in runs.values():
    c = r.cos
    if c is None or not len(c):
      continue
    fr.append(float(np.mean(np.any(c < 0, axis=1))))
    pooled.append(c.ravel())
  if not fr:
    return math.nan, None
  return float(np.mean(fr)), np.concatenate(pooled)


def per_seed_values(results: dict) -> dict:
  """metric -> entry -> seed -> value (test split), with ``dm`` and ``dm_stl``."""
  ew = _ok_runs(results.get(EW))
  single = _ok_runs(results.get(SINGLE))
  out = {k: {} for k in (*TEST_METRICS, "dm", "dm_stl")}
  for name, entry in results.items():
    ok = _ok_runs(entry)
    for k in TEST_METRICS:
      out[k][name] = {s: float(r.test[k]) for s, r in ok.items()}
    out["dm"][name] = {s: delta_m(r.test, ew[s].test) for s, r in ok.items() if s in ew}
    out["dm_stl"][name] = {s: delta_m(r.test, single[s].test) for s, r in ok.items() if s in single}
  return out


def summarise(results: dict, order: list, *, alpha: float = 0.05) -> list[dict]:
  """One row per entry of ``order`` (see the module docstring)."""
  values = per_seed_values(results)
  compared = [m for m in order if m != EW]
  comps = {}
  for k in COMPARED:
    if EW in values[k] and values[k][EW]:
      res = stats.compare_to_reference(
        values[k], EW, higher_is_better=HIGHER_IS_BETTER[k], alpha=alpha, methods=compared
      )
      comps[k] = {c.method: c for c in res}
  rows = []
  for name in order:
    entry = results.get(name)
    row = {"method": name, "n_ok": 0, "n_seeds": 0, "note": ""}
    if not isinstance(entry, dict):
      row["note"] = entry or "not run"
      rows.append(row)
      continue
    runs = entry["runs"]
    ok = _ok_runs(entry)
    row["n_seeds"], row["n_ok"] = len(runs), len(ok)
    row["note"] = "; ".join(f"seed {s}: {r.status}" for s, r in runs.items() if r.status != "ok")
    row["trials"] = len(entry["trials"])
    row["chosen_lr"] = entry["chosen"].get("lr", math.nan) if entry["chosen"] else math.nan
    row["chosen"] = _chosen_text(entry["chosen"])
    row["margin"] = entry.get("margin", math.nan)
    row["val_score"] = float(np.mean([r.score for r in ok.values()])) if ok else math.nan
    for k in (*TEST_METRICS, "dm_stl"):
      v = list(values[k].get(name, {}).values())
      row[f"{k}_mean"] = float(np.mean(v)) if v else math.nan
      row[f"{k}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    for k, cs in comps.items():
      c = cs.get(name)
      if c is None:
        continue
      for f, v in c.as_dict().items():
        if f != "method":
          row[f"d_{k}_{f}"] = v
    frac, pooled = _diag(ok)
    row["conflict"] = frac
    for q in (5, 50, 95):
      row[f"cos{q}"] = float(np.percentile(pooled, q)) if pooled is not None else math.nan
    row["steps"] = float(np.mean([r.steps for r in ok.values()])) if ok else math.nan
    row["wall_s"] = float(entry.get("wall_s", 0.0))
    rows.append(row)
  return rows


def _chosen_text(chosen: dict | None) -> str:
  if not chosen:
    return "-"
  lr = chosen.get("lr")
  if isinstance(lr, list):  # single-task: one learning rate per task
    lr_text = "lr " + "/".join(f"{x:g}" for x in lr)
  else:
    lr_text = f"lr {lr:g}"
  hp = tuning.describe(chosen.get("hparams", {}))
  return lr_text if hp == "-" else f"{lr_text}; {hp}"


def _fmt(mean, std, n, digits=4):
  if n == 0 or not np.isfinite(mean):
    return "-"
  return f"{mean:.{digits}f}" + (f"{PM}{std:.{digits}f}" if n > 1 and np.isfinite(std) else "")


DIGITS = {"dm": 2, "click_auc": 4, "like_auc": 4, "rmse": 4, "hr": 4, "ndcg": 4}


def paired_cell(row: dict, k: str) -> str:
  """``+0.0012 [-0.0003, +0.0027] (3/5) better``: mean difference, the
  interval at Holm's level, seeds won / paired, decision."""
  p = f"d_{k}_"
  if not row.get(p + "n"):
    return "-"
  d = DIGITS[k]
  lo, hi = row[p + "ci_holm_low"], row[p + "ci_holm_high"]
  ci = f" [{lo:+.{d}f}, {hi:+.{d}f}]" if np.isfinite(lo) else ""
  dec = row[p + "decision"]
  dec = f"**{dec}**" if dec in ("better", "worse") else dec
  return f"{row[p + 'mean']:+.{d}f}{ci} ({row[p + 'wins']}/{row[p + 'n']}){NB}{dec}"


def table_markdown(rows: list[dict]) -> str:
  """Test metrics (mean ± std over seeds) and the tuning record."""
  cols = ["click AUC", "like AUC", "RMSE", "HR@10", "NDCG@10", "Δm vs STL (%)"]
  lines = [
    "| Method | " + " | ".join(cols) + " | trials | chosen on validation | Notes |",
    "|---|" + "---:|" * len(cols) + "---:|---|---|",
  ]
  for r in rows:
    cells = [
      _fmt(r.get(f"{k}_mean", math.nan), r.get(f"{k}_std", math.nan), r["n_ok"])
      for k in TEST_METRICS
    ]
    if r["method"] == SINGLE:
      cells.append("0 (reference)" if r["n_ok"] else "-")
    else:
      cells.append(
        _fmt(r.get("dm_stl_mean", math.nan), r.get("dm_stl_std", math.nan), r["n_ok"], 2)
      )
    note = r["note"]
    if r["n_seeds"] and r["n_ok"] < r["n_seeds"]:
      note = f"{r['n_ok']}/{r['n_seeds']} seeds ok; " + note
    trials = str(r.get("trials", "-"))
    chosen = r.get("chosen", "-")
    if np.isfinite(r.get("margin", math.nan)):
      chosen += f" (margin {r['margin']:.4f})"
    lines.append(
      f"| {r['method']} | "
      + " | ".join(cells)
      + f" | {trials} | {chosen} | {note.replace('|', '/')} |"
    )
  return "\n".join(lines) + "\n"


def paired_markdown(rows: list[dict]) -> str:
  """Paired differences to equal weighting, sorted by the Δm effect."""
  keys = ("dm", "click_auc", "like_auc", "rmse", "ndcg", "hr")
  comp = [r for r in rows if r.get("d_dm_n")]
  comp.sort(key=lambda r: -r["d_dm_mean"] if np.isfinite(r["d_dm_mean"]) else math.inf)
  lines = [
    "| Method | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
    "|---|" + "---:|" * len(keys),
  ]
  for r in comp:
    lines.append(f"| {r['method']} | " + " | ".join(paired_cell(r, k) for k in keys) + " |")
  skipped = [r for r in rows if not r.get("d_dm_n") and r["method"] != EW]
  not_run = [r["method"] for r in skipped if r["note"].startswith("not run on this backbone")]
  missing = [r["method"] for r in skipped if r["method"] not in not_run]
  text = "\n".join(lines) + "\n"
  if missing:
    text += f"\nNot compared (fewer than two paired seeds, or failed): {', '.join(missing)}.\n"
  if not_run:
    text += f"\nNot run on this backbone in the default budget: {len(not_run)} entries.\n"
  return text


def diagnostics_markdown(rows: list[dict]) -> str:
  lines = [
    "| Method | steps with a conflicting pair | pairwise cosine 5% / 50% / 95% |",
    "|---|---:|---:|",
  ]
  for r in rows:
    if r["method"] == SINGLE or not np.isfinite(r.get("conflict", math.nan)):
      continue
    q = NB + "/" + NB
    qs = q.join(f"{r[f'cos{p}']:+.2f}" for p in (5, 50, 95))
    lines.append(f"| {r['method']} | {100 * r['conflict']:.0f}{NB}% | {qs} |")
  return "\n".join(lines) + "\n"


def trials_markdown(results: dict, order: list) -> str:
  """Every tuning trial's validation score (seed 0)."""
  lines = [
    "| Method | lr | hyperparameters | validation score | status |",
    "|---|---:|---|---:|---|",
  ]
  for name in order:
    entry = results.get(name)
    if not isinstance(entry, dict):
      continue
    for t in entry["trials"]:
      v = t["score"]
      hp = tuning.describe(t.get("hparams", {}))
      if "task" in t:
        hp = f"task {t['task']}"
      cell = f"{v:.5f}" if np.isfinite(v) else "-"
      if t.get("chosen"):
        cell = f"**{cell}**"
      lines.append(f"| {name} | {t['lr']:g} | {hp} | {cell} | {t['status']} |")
  return "\n".join(lines) + "\n"


CSV_FIELDS = ["backbone", "method", "n_ok", "n_seeds", "trials", "chosen", "chosen_lr", "margin"]
CSV_FIELDS += ["val_score"]
CSV_FIELDS += [f"{k}_{s}" for k in (*TEST_METRICS, "dm_stl") for s in ("mean", "std")]
_PAIR = ["n", "mean", "std", "ci95_low", "ci95_high", "p", "p_holm"]
_PAIR += ["ci_holm_low", "ci_holm_high", "decision", "wins", "losses", "ties", "m"]
CSV_FIELDS += [f"d_{k}_{f}" for k in COMPARED for f in _PAIR]
CSV_FIELDS += ["conflict", "cos5", "cos50", "cos95", "steps", "wall_s", "note"]


def _cell(v):
  if isinstance(v, float):
    return "" if not math.isfinite(v) else f"{v:.6g}"
  return "" if v is None else str(v)


def table_csv(rows_by_backbone: dict, meta: dict) -> str:
  """One row per (backbone, entry); ``# key: value`` lines first (command,
  date, commit, machine, data). Read with ``csv.DictReader`` over the lines
  that do not start with ``#``."""
  buf = io.StringIO()
  for k, v in meta.items():
    buf.write(f"# {k}: {v}\n")
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for backbone, rows in rows_by_backbone.items():
    for r in rows:
      w.writerow({f: _cell(r.get(f, "")) for f in CSV_FIELDS} | {"backbone": backbone})
  return buf.getvalue()


def read_csv(path: str) -> tuple[dict, list[dict]]:
  """``(meta, rows)`` of a file written by :func:`table_csv`."""
  meta, lines = {}, []
  with open(path, newline="") as f:
    for line in f:
      if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
      else:
        lines.append(line)
  return meta, list(csv.DictReader(lines))
