"""The effect figure of the benchmarks: paired differences to equal
weighting with intervals (rows of ``stats.PairedComparison`` fields).

One panel per backbone; one row per entry, sorted by the mean paired
difference (best on top); a thin bar with caps: the interval at Holm's level
(it excludes zero exactly when the decision is "better" or "worse"), a thick
bar: the per-comparison 95% interval; colour by decision. Linear axis around
the bulk of the entries: an entry far outside is drawn at the panel's edge
with an arrow and its value. GradCraft (purple label) and the best entries
(bold) carry their values in their labels. A caption line gives the data,
machine, date, commit and command.

This is a plain module used by the benchmarks (``sys.path`` must include
``benchmarks/``); it is not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

import textwrap

import numpy as np

COLORS = {"better": "#2ca02c", "worse": "#d62728", "tie": "#7f7f7f"}
GRADCRAFT = "gradcraft"
GRADCRAFT_COLOR = "#7b3294"  # its label (purple); its interval is coloured by decision


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _limits(mean, lo, hi):
  """x-range of the bulk: the 10-90% range of the means, padded by the
  typical interval width, always including zero."""
  q10, q90 = np.percentile(mean, [10, 90])
  half = np.nanmedian(np.maximum(hi - mean, mean - lo)) if np.any(np.isfinite(lo)) else 0.0
  pad = max(2.0 * float(np.nan_to_num(half)), 0.25 * (q90 - q10), 1e-6)
  left, right = min(q10 - pad, 0.0), max(q90 + pad, 0.0)
  # Widen to every interval that is not far outside (at most 3x the bulk's width).
  width = right - left
  inside_lo = lo[np.isfinite(lo) & (lo > left - width)]
  inside_hi = hi[np.isfinite(hi) & (hi < right + width)]
  left = min([left, *inside_lo.tolist()])
  right = max([right, *inside_hi.tolist()])
  margin = 0.04 * (right - left)
  return left - margin, right + margin


def plot_effects(
  rows_by_backbone: dict,
  prefix: str,
  path: str,
  *,
  label: str,
  title: str,
  caption: str,
  digits: int = 4,
  lower_is_better: bool = False,
  n_best: int = 3,
) -> bool:
  """Paired difference to equal weighting, one panel per key of ``rows_by_backbone``.

  Args:
    rows_by_backbone: panel name -> rows (dicts) holding ``<prefix>mean``,
      ``<prefix>ci95_low``/``_high``, ``<prefix>ci_holm_low``/``_high``,
      ``<prefix>decision``, ``<prefix>n`` and ``<prefix>m`` (the fields of
      ``stats.PairedComparison.as_dict``) and ``method``.
    prefix: the prefix of those fields (e.g. ``"d_dm_"``).
    path: the PNG to write.
    label: the quantity, for the x axis (e.g. ``"Δm vs EW (%)"``).
    title: the first line of the figure's title (data set, split).
    caption: the caption line at the bottom (data, machine, date, commit, command).
    digits: decimals of the values in the labels.
    lower_is_better: the metric improves downwards (RMSE, a loss).
    n_best: how many of the best entries to label.

  Returns:
    Whether a figure was written (``False`` when no row has a comparison).
  """
  plt = _plt()
  p = prefix
  sign = -1.0 if lower_is_better else 1.0
  panels = {}
  for b, rows in rows_by_backbone.items():
    comp = [r for r in rows if r.get(p + "n") and np.isfinite(r.get(p + "mean", np.nan))]
    if comp:
      comp.sort(key=lambda r: -sign * r[p + "mean"])
      panels[b] = comp
  if not panels:
    return False
  order = list(panels)
  first, rest = order[0], order[1:]
  stacked = bool(rest) and sum(len(panels[b]) + 4 for b in rest) <= len(panels[first]) + 4
  if stacked:
    # Smaller panels (a backbone run on a few entries) share the second
    # column, each as tall as its rows, instead of stretching to the first.
    fig = plt.figure(figsize=(11.2, 0.26 * len(panels[first]) + 3.0))
    grid = fig.add_gridspec(1, 2)
    heights = [len(panels[b]) + 4 for b in rest]
    spare = len(panels[first]) + 4 - sum(heights)  # rows left empty below
    right = grid[0, 1].subgridspec(
      len(rest) + (spare > 0), 1, height_ratios=heights + [spare] * (spare > 0)
    )
    axes_list = [fig.add_subplot(grid[0, 0])]
    axes_list += [fig.add_subplot(right[k, 0]) for k in range(len(rest))]
  else:
    n = max(len(c) for c in panels.values())
    fig, axes = plt.subplots(
      1,
      len(panels),
      figsize=(max(5.6 * len(panels), 7.0), 0.26 * n + 3.0),
      squeeze=False,
    )
    axes_list = list(axes[0])
  d = digits
  for ax, (b, comp) in zip(axes_list, panels.items()):
    names = [r["method"] for r in comp]
    mean = np.array([r[p + "mean"] for r in comp])
    lo95 = np.array([r[p + "ci95_low"] for r in comp], float)
    hi95 = np.array([r[p + "ci95_high"] for r in comp], float)
    loh = np.array([r[p + "ci_holm_low"] for r in comp], float)
    hih = np.array([r[p + "ci_holm_high"] for r in comp], float)
    dec = [r[p + "decision"] for r in comp]
    y = np.arange(len(comp))
    left, right = _limits(mean, loh, hih)
    ax.axvline(0.0, color="k", lw=0.9)
    ranked = np.argsort(-sign * mean)
    best = set(int(i) for i in ranked[:n_best]) | {i for i in y if dec[i] == "better"}
    for i in y:
      c = COLORS.get(dec[i], "#7f7f7f")
      inside = left <= mean[i] <= right
      if inside:
        if np.isfinite(loh[i]):  # Holm's level: thin, with caps
          x0, x1 = max(loh[i], left), min(hih[i], right)
          ax.plot([x0, x1], [i, i], color=c, lw=1.0)
          for x, cut in ((x0, loh[i] < left), (x1, hih[i] > right)):
            if not cut:
              ax.plot([x, x], [i - 0.22, i + 0.22], color=c, lw=1.0)
        if np.isfinite(lo95[i]):  # per comparison 95%: thick
          ax.plot([max(lo95[i], left), min(hi95[i], right)], [i, i], color=c, lw=3.5, alpha=0.55)
        ax.plot(mean[i], i, "o", color=c, ms=5, mec="k", mew=0.5, zorder=3)
      else:
        edge = left if mean[i] < left else right
        ax.annotate(
          f"{mean[i]:+.{d}f}",
          (edge, i),
          xytext=(12 if edge == left else -12, 0),
          textcoords="offset points",
          ha="left" if edge == left else "right",
          va="center",
          fontsize=7,
          color=c,
          arrowprops=dict(arrowstyle="<-" if edge == left else "->", color=c, lw=0.8),
        )
    labels = [
      f"{nm}  {mean[i]:+.{d}f}" if (nm == GRADCRAFT or i in best) else nm
      for i, nm in enumerate(names)
    ]
    ax.set_xlim(left, right)
    ax.set_ylim(len(comp) - 0.5, -0.5)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7.5)
    for i, lab in enumerate(ax.get_yticklabels()):
      if names[i] == GRADCRAFT:
        lab.set_color(GRADCRAFT_COLOR)
        lab.set_fontweight("bold")
      elif i in best:
        lab.set_fontweight("bold")
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)
    direction = "lower is better" if lower_is_better else "higher is better"
    ax.set_title(f"{b} ({comp[0].get(p + 'm', len(comp))} comparisons)", fontsize=10)
    ax.set_xlabel(f"{label}: difference to equal weighting ({direction})", fontsize=8.5)
  width, height = fig.get_size_inches()
  chars = int(width * 17)  # characters per line at the caption's font size
  head = [
    f"{title}: paired difference to equal weighting over seeds, {label}",
    "thin with caps: interval at Holm's level over the comparisons of its panel (it decides); "
    "thick: 95% per comparison",
    "green better, red worse, grey tie; sorted by effect; "
    "GradCraft (purple) and the best entries (bold) with their values",
  ]
  head = [ln for part in head for ln in textwrap.wrap(part, int(width * 15))]
  fig.suptitle("\n".join(head), fontsize=9)
  foot = textwrap.wrap(caption, chars)
  fig.text(0.5, 0.01, "\n".join(foot), ha="center", va="bottom", fontsize=7)
  bottom = (0.12 + 0.13 * len(foot)) / height
  fig.tight_layout(rect=(0, bottom, 1, 1))  # leaves room for the suptitle itself
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
