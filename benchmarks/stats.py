r"""Paired comparisons of methods against a reference over seeds.

Every benchmark run of a seed shares its initial parameters, data order and
evaluation data across methods, so a method is compared with the reference
(equal weighting) seed by seed: the differences ``d_s = x_s - r_s`` of the
seeds where both ran are the sample.

For each method (:func:`compare_to_reference`):

* ``mean``: the paired mean difference :math:`\bar d`, ``std`` its sample
  standard deviation :math:`s` (``ddof = 1``);
* ``ci95``: the 95% Student t-interval :math:`\bar d \pm t_{0.975,\,n-1}\,
  s / \sqrt n` (per comparison);
* ``p``: the two-sided p-value of the paired t-test of :math:`\bar d = 0`;
  ``p_holm``: Holm's step-down adjusted p-value over the ``m`` methods
  compared (Holm, "A simple sequentially rejective multiple test procedure",
  Scand. J. Statist. 1979): with the p-values sorted, :math:`p_{(1)} \le
  \dots \le p_{(m)}`, :math:`\tilde p_{(i)} = \max_{j \le i}
  \min(1, (m - j + 1)\, p_{(j)})`;
* ``ci_holm``: the t-interval at the level of Holm's test for that
  comparison, :math:`1 - \alpha\, p / \tilde p` (that is :math:`1 - \alpha /
  (m - i + 1)` at step ``i``, unless an earlier step's level is stricter). It excludes zero
  exactly when Holm's procedure rejects :math:`\bar d = 0` at family-wise
  level ``alpha``; it is a per-comparison interval at that level, not a
  simultaneous confidence region;
* ``decision``: ``"better"`` or ``"worse"`` where Holm rejects (the
  Holm-level interval excludes zero; the direction follows
  ``higher_is_better``), ``"tie"`` otherwise, ``"n/a"`` with fewer than two
  paired seeds;
* ``wins`` / ``losses`` / ``ties``: seeds where the method is better, worse,
  exactly equal.

The Student t distribution is computed here (no SciPy): for integer degrees
of freedom the CDF has a closed form as a finite trigonometric series
(Abramowitz and Stegun 26.7.3 and 26.7.4), inverted by bisection; ``df =
inf`` is the standard normal.

This is a plain module used by the benchmarks (``sys.path`` must include
``benchmarks/``); it is not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
  "t_cdf",
  "t_quantile",
  "t_two_sided_p",
  "holm_adjust",
  "PairedComparison",
  "paired_comparison",
  "compare_to_reference",
]

DECISIONS = ("better", "worse", "tie", "n/a")


def _check_df(df: float) -> float:
  if df == math.inf:
    return df
  if isinstance(df, bool) or not float(df).is_integer() or df < 1:
    raise ValueError(f"degrees of freedom must be an integer >= 1 or inf, got {df!r}")
  return int(df)


def _central(t: float, df: float) -> float:
  """``P(|T| <= t)`` for ``t >= 0`` (A&S 26.7.3 / 26.7.4; normal for ``df = inf``)."""
  if df == math.inf:
    return math.erf(t / math.sqrt(2.0))
  if math.isinf(t):
    return 1.0
  theta = math.atan(t / math.sqrt(df))
  s, c2 = math.sin(theta), math.cos(theta) ** 2
  if df % 2 == 1:
    if df == 1:
      return 2.0 * theta / math.pi
    # theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))
    term, total = 1.0, 1.0
    for k in range(1, (df - 3) // 2 + 1):
      term *= c2 * (2 * k) / (2 * k + 1)
      total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)
  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
  term, total = 1.0, 1.0
  for k in range(1, (df - 2) // 2 + 1):
    term *= c2 * (2 * k - 1) / (2 * k)
    total += term
  return s * total


def t_cdf(t: float, df: float) -> float:
  """CDF of Student's t with ``df`` degrees of freedom (integer ``>= 1`` or ``inf``)."""
  df = _check_df(df)
  t = float(t)
  if math.isnan(t):
    raise ValueError("t is NaN")
  a = _central(abs(t), df)
  return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_two_sided_p(t: float, df: float) -> float:
  """Two-sided p-value ``P(|T| >= |t|)``."""
  df = _check_df(df)
  if math.isnan(float(t)):
    raise ValueError("t is NaN")
  return max(0.0, 1.0 - _central(abs(float(t)), df))


def t_quantile(p: float, df: float) -> float:
  """The ``p``-quantile of Student's t (``0 < p < 1``), by bisection on the CDF.

  Accurate to about ``1e-12`` relative; e.g. ``t_quantile(0.975, 4) =
  2.776445...``.
  """
  df = _check_df(df)
  p = float(p)
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p!r}")
  if p == 0.5:
    return 0.0
  target = abs(2.0 * p - 1.0)  # P(|T| <= q)
  lo, hi = 0.0, 1.0
  while _central(hi, df) < target:
    lo, hi = hi, 2.0 * hi
    if hi > 1e300:
      return math.copysign(math.inf, p - 0.5)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if _central(mid, df) < target:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-14 * hi:
      break
  q = 0.5 * (lo + hi)
  return q if p > 0.5 else -q


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values, in the input order.

  ``nan`` entries (comparisons that could not be made) are left out of the
  family and stay ``nan``.
  """
  p = np.asarray(p_values, np.float64)
  out = np.full(p.shape, np.nan)
  valid = np.flatnonzero(np.isfinite(p))
  if valid.size == 0:
    return out
  if np.any((p[valid] < 0) | (p[valid] > 1)):
    raise ValueError(f"p-values must be in [0, 1], got {p[valid]}")
  m = valid.size
  order = valid[np.argsort(p[valid], kind="stable")]
  running = 0.0
  for i, k in enumerate(order):
    running = max(running, min(1.0, (m - i) * p[k]))
    out[k] = running
  return out


@dataclasses.dataclass(frozen=True)
class PairedComparison:
  """One method against the reference over the seeds where both ran."""

  method: str
  n: int  # paired seeds
  mean: float  # mean of method - reference
  std: float  # sample standard deviation of the differences (ddof=1)
  ci95: tuple[float, float]  # per-comparison 95% t-interval
  p: float  # two-sided paired t-test
  p_holm: float  # Holm-adjusted over the compared methods
  ci_holm: tuple[float, float]  # t-interval at the Holm level of this comparison
  decision: str  # "better" / "worse" / "tie" / "n/a"
  wins: int
  losses: int
  ties: int
  m: int  # size of the Holm family

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["ci95_low"], d["ci95_high"] = d.pop("ci95")
    d["ci_holm_low"], d["ci_holm_high"] = d.pop("ci_holm")
    return d


def _t_interval(mean: float, std: float, n: int, level: float) -> tuple[float, float]:
  if n < 2:
    return (math.nan, math.nan)
  if std == 0.0:
    return (mean, mean)
  half = t_quantile(0.5 + 0.5 * level, n - 1) * std / math.sqrt(n)
  return (mean - half, mean + half)


def paired_comparison(
  x: Mapping[object, float] | Sequence[float],
  ref: Mapping[object, float] | Sequence[float],
  *,
  higher_is_better: bool = True,
) -> dict:
  """Paired statistics of one method (``x``) against ``ref`` (no multiplicity adjustment).

  ``x`` and ``ref`` are mappings seed -> value (paired on the seeds both
  have, non-finite values dropped) or equal-length sequences. Returns a dict
  with ``n``, ``mean``, ``std``, ``ci95``, ``p``, ``t``, ``wins``,
  ``losses``, ``ties``.
  """
  if isinstance(x, Mapping) != isinstance(ref, Mapping):
    raise TypeError("x and ref must both be mappings (seed -> value) or both sequences")
  if isinstance(x, Mapping):
    seeds = [s for s in x if s in ref]
    pairs = [(float(x[s]), float(ref[s])) for s in seeds]
  else:
    if len(x) != len(ref):
      raise ValueError(f"x and ref have different lengths ({len(x)} and {len(ref)})")
    pairs = [(float(a), float(b)) for a, b in zip(x, ref)]
  d = np.array([a - b for a, b in pairs if math.isfinite(a) and math.isfinite(b)], np.float64)
  n = int(d.size)
  sign = 1.0 if higher_is_better else -1.0
  out = {
    "n": n,
    "mean": float(d.mean()) if n else math.nan,
    "std": float(d.std(ddof=1)) if n > 1 else math.nan,
    "wins": int(np.sum(sign * d > 0)),
    "losses": int(np.sum(sign * d < 0)),
    "ties": int(np.sum(d == 0)),
  }
  if n < 2:
    out.update(ci95=(math.nan, math.nan), p=math.nan, t=math.nan)
    return out
  mean, std = out["mean"], out["std"]
  if std == 0.0:
    t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
  else:
    t = mean / (std / math.sqrt(n))
  out["t"] = t
  out["p"] = 1.0 if t == 0.0 else (0.0 if math.isinf(t) else t_two_sided_p(t, n - 1))
  out["ci95"] = _t_interval(mean, std, n, 0.95)
  return out


def compare_to_reference(
  values: Mapping[str, Mapping[object, float]],
  reference: str,
  *,
  higher_is_better: bool = True,
  alpha: float = 0.05,
  methods: Sequence[str] | None = None,
) -> list[PairedComparison]:
  """Every method of ``values`` (or of ``methods``) against ``values[reference]``.

  Args:
    values: method -> (seed -> value) of one metric.
    reference: the reference method's key (not compared with itself).
    higher_is_better: direction of the metric (``False`` for RMSE, a loss).
    alpha: family-wise error level of Holm's procedure.
    methods: the methods to compare (default: every key but ``reference``),
      in the order of the result. The Holm family is the methods with at
      least two paired seeds.

  Returns:
    One :class:`PairedComparison` per method (see the module docstring).
  """
  if reference not in values:
    raise KeyError(f"reference {reference!r} not in values")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
  names = [m for m in (methods if methods is not None else values) if m != reference]
  ref = values[reference]
  raw = [
    paired_comparison(values.get(m, {}), ref, higher_is_better=higher_is_better) for m in names
  ]
  p_holm = holm_adjust([r["p"] for r in raw])
  m_family = int(np.sum(np.isfinite(p_holm)))
  out = []
  for name, r, ph in zip(names, raw, p_holm):
    if r["n"] < 2:
      ci_h, decision = (math.nan, math.nan), "n/a"
    else:
      if r["std"] == 0.0 or r["p"] == 0.0:
        ci_h = (r["mean"], r["mean"])
      else:
        level = 1.0 - alpha * r["p"] / ph
        ci_h = _t_interval(r["mean"], r["std"], r["n"], level)
      reject = bool(ph < alpha) and r["mean"] != 0.0
      if not reject:
        decision = "tie"
      else:
        decision = "better" if (r["mean"] > 0) == higher_is_better else "worse"
    out.append(
      PairedComparison(
        method=name,
        n=r["n"],
        mean=r["mean"],
        std=r["std"],
        ci95=tuple(r["ci95"]),
        p=r["p"],
        p_holm=float(ph),
        ci_holm=tuple(ci_h),
        decision=decision,
        wins=r["wins"],
        losses=r["losses"],
        ties=r["ties"],
        m=m_family,
      )
    )
  return out
