"""Figures of the Census benchmark (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np

from .report import EW, SINGLE

CURVE_METHODS = ("mean", "gradcraft", "mgda", "pcgrad")
CURVE_STYLE = {  # colour, line width, z-order: EW thick and underneath
  "mean": ("#9e9e9e", 3.2, 1),
  "gradcraft": ("#d62728", 1.3, 3),
  "mgda": ("#2ca02c", 1.3, 2),
  "pcgrad": ("#1f77b4", 1.3, 4),
}


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _ticker():
  import matplotlib.ticker as ticker  # pylint: disable=import-outside-toplevel

  return ticker


def plot_auc(tables: dict, path: str) -> None:
  """AV-A (mean ± std over seeds) per method, one panel per backbone."""
  plt = _plt()
  tables = {b: [r for r in rows if r["n_ok"]] for b, rows in tables.items()}
  tables = {b: rows for b, rows in tables.items() if rows}
  if not tables:
    return
  n = max(len(rows) for rows in tables.values())
  fig, axes = plt.subplots(
    1,
    len(tables),
    figsize=(max(5.2 * len(tables), 7.5), 0.32 * n + 1.8),
    squeeze=False,
    layout="constrained",
  )
  for ax, (backbone, rows) in zip(axes[0], tables.items()):
    names = [r["method"] for r in rows]
    m = np.array([r["AV-A_mean"] for r in rows])
    s = np.nan_to_num(np.array([r["AV-A_std"] for r in rows]))
    y = np.arange(len(rows))
    colors = ["#7f7f7f" if nm in (SINGLE, EW) else "#1f77b4" for nm in names]
    colors = ["#d62728" if nm.startswith("gradcraft") else c for nm, c in zip(names, colors)]
    # Points with error bars (a bar's length from an arbitrary axis origin
    # means nothing here). The axis spans the bulk of the methods; a method
    # far below (a collapsed run) is drawn at the left edge with its value.
    ref = np.nanmedian(m)
    lo_all, hi = np.nanmin(m - s), np.nanmax(m + s)
    lo = max(lo_all, ref - 0.004)
    pad = max(0.08 * (hi - lo), 3e-4)
    left = lo - pad
    off = m < left
    ax.errorbar(
      np.where(off, np.nan, m),
      y,
      xerr=np.where(off, np.nan, s),
      fmt="none",
      ecolor="k",
      capsize=2,
      lw=0.8,
    )
    ax.scatter(np.where(off, np.nan, m), y, c=colors, s=28, zorder=3)
    for yi in np.flatnonzero(off):
      ax.annotate(
        f"◀ {m[yi]:.3f} (off scale)",
        (left, y[yi]),
        xytext=(3, 0),
        textcoords="offset points",
        va="center",
        fontsize=7,
        color=colors[yi],
      )
    ax.set_xlim(left, hi + pad)
    ax.xaxis.set_major_locator(_ticker().MaxNLocator(4))
    for ref, ls in ((SINGLE, "--"), (EW, ":")):
      if ref in names:
        ax.axvline(m[names.index(ref)], color="k", ls=ls, lw=0.9)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{backbone}: test AV-A", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)
  fig.suptitle(
    "Census-Income: mean test AUC over tasks (mean ± std over seeds)\n"
    "dashed: single-task models, dotted: equal weighting; grey: references, red: GradCraft",
    fontsize=10,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _smooth(x, w):
  if len(x) < w or w <= 1:
    return x
  k = np.ones(w) / w
  return np.stack([np.convolve(x[:, t], k, mode="valid") for t in range(x.shape[1])], axis=1)


def plot_curves(results: dict, task_names, path: str, window: int) -> bool:
  """Per-task training loss of seed 0 for a few methods; a dot marks the
  selected checkpoint of each run."""
  plt = _plt()
  from matplotlib.lines import Line2D

  runs = {
    m: results[m][0]
    for m in CURVE_METHODS
    if isinstance(results.get(m), dict) and 0 in results[m] and results[m][0].losses is not None
  }
  if not runs:
    return False
  T = len(task_names)
  fig, axes = plt.subplots(1, T, figsize=(4.6 * T, 3.9), squeeze=False, layout="constrained")
  axes = axes[0]
  for name, r in runs.items():
    color, lw, z = CURVE_STYLE[name]
    sm = _smooth(r.losses, window)
    off = len(r.losses) - len(sm) + 1
    x = np.arange(len(sm)) + off
    for t in range(T):
      axes[t].plot(x, sm[:, t], color=color, lw=lw, zorder=z, alpha=0.85 if name == EW else 1)
      if r.best_step and off <= r.best_step < off + len(sm):
        axes[t].plot(
          r.best_step,
          sm[r.best_step - off, t],
          "o",
          color=color,
          mec="k",
          mew=0.6,
          ms=6,
          zorder=z + 10,
        )
  for t in range(T):
    axes[t].set_title(f"training loss: {task_names[t]}", fontsize=10)
    axes[t].set_xlabel("step")
    axes[t].grid(alpha=0.3)
  axes[0].set_ylabel(f"BCE, moving average over {window} steps")
  handles = [
    Line2D([], [], color=CURVE_STYLE[m][0], lw=CURVE_STYLE[m][1], label=m) for m in runs
  ] + [Line2D([], [], ls="", marker="o", color="w", mec="k", ms=6, label="selected checkpoint")]
  fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
  fig.suptitle(
    "Per-task training loss, seed 0 (equal weighting: thick grey, drawn underneath)",
    fontsize=10,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_cosines(results: dict, rows: list, pairs: list, path: str, window: int) -> bool:
  """Top: pairwise task-gradient cosines over training (seed 0) for equal
  weighting and GradCraft, all parameters (solid) and shared parameters
  (dashed). Bottom: fraction of steps with a conflicting pair, per method."""
  plt = _plt()
  show = [
    m
    for m in (EW, "gradcraft")
    if isinstance(results.get(m), dict) and 0 in results[m] and results[m][0].cos_all is not None
  ]
  diag = [r for r in rows if np.isfinite(r.get("conflict_all", np.nan))]
  if not show and not diag:
    return False
  P = len(pairs)
  fig = plt.figure(figsize=(max(4.4 * P, 11), 7.4), layout="constrained")
  gs = fig.add_gridspec(2, P, height_ratios=[1, 1.1])
  colors = {EW: "#555555", "gradcraft": "#d62728"}
  for p, (a, b) in enumerate(pairs):
    ax = fig.add_subplot(gs[0, p])
    for m in show:
      r = results[m][0]
      for key, ls, lab in (("cos_all", "-", "all parameters"), ("cos_shared", "--", "shared")):
        c = _smooth(getattr(r, key)[:, p : p + 1], window)[:, 0]
        x = np.arange(len(c)) + (len(getattr(r, key)) - len(c)) + 1
        ax.plot(x, c, ls=ls, color=colors[m], lw=1.2, label=f"{m}, {lab}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(f"{a} / {b}", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if p == 0:
      ax.set_ylabel(f"cosine (moving avg, {window} steps)")
      ax.legend(fontsize=8, loc="best")
  ax = fig.add_subplot(gs[1, :])
  if diag:
    x = np.arange(len(diag))
    ax.bar(x - 0.2, [100 * r["conflict_all"] for r in diag], 0.4, label="all parameters")
    ax.bar(x + 0.2, [100 * r["conflict_shared"] for r in diag], 0.4, label="shared parameters")
    ax.set_xticks(x)
    ax.set_xticklabels([r["method"] for r in diag], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("% of training steps with\na conflicting pair (cos < 0)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
    "Task-gradient conflict during training (training batches; Gram matrix of all "
    "parameters or of the shared ones)",
    fontsize=10,
  )
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True
