"""benchmarks/stats.py: Student t, Holm's procedure and the paired comparisons."""

import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import stats  # noqa: E402

# Published two-sided critical values (e.g. NIST/SEMATECH e-Handbook, Table of
# the t distribution; Abramowitz & Stegun Table 26.10): (p, df) -> quantile.
KNOWN = {
  (0.975, 1): 12.7062047,
  (0.975, 2): 4.3026527,
  (0.975, 3): 3.1824463,
  (0.975, 4): 2.7764451,
  (0.975, 5): 2.5705818,
  (0.975, 6): 2.4469119,
  (0.975, 7): 2.3646243,
  (0.975, 8): 2.3060041,
  (0.975, 9): 2.2621572,
  (0.975, 10): 2.2281389,
  (0.975, 20): 2.0859634,
  (0.975, 30): 2.0422725,
  (0.995, 1): 63.656741,
  (0.995, 4): 4.604095,
  (0.995, 10): 3.169273,
  (0.995, 30): 2.749996,
  (0.95, 1): 6.313752,
  (0.95, 5): 2.015048,
  (0.95, 10): 1.812461,
  (0.975, math.inf): 1.9599640,
}


@pytest.mark.parametrize("p_df, expected", sorted(KNOWN.items(), key=str))
def test_t_quantile_matches_published_tables(p_df, expected):
  p, df = p_df
  assert stats.t_quantile(p, df) == pytest.approx(expected, rel=2e-7)
  assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, rel=2e-7)
  assert stats.t_cdf(expected, df) == pytest.approx(p, abs=1e-6)  # table rounding


def test_t_cdf_closed_forms():
  # df = 1: Cauchy, 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2)).
  for t in (-3.0, -0.4, 0.0, 0.7, 5.0, 40.0):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    # df = 3: 1/2 + (atan(t/sqrt3) + sqrt3 t / (3 + t^2)) / pi.
    r3 = math.sqrt(3.0)
    want3 = 0.5 + (math.atan(t / r3) + r3 * t / (3 + t * t)) / math.pi
    assert stats.t_cdf(t, 3) == pytest.approx(want3, abs=1e-14)
  # Large df approaches the normal.
  assert stats.t_cdf(1.96, 100_000) == pytest.approx(stats.t_cdf(1.96, math.inf), abs=1e-5)


def test_t_cdf_monotone_and_symmetric():
  ts = np.linspace(-8, 8, 161)
  for df in (1, 2, 3, 4, 7, 12, 29, math.inf):
    c = np.array([stats.t_cdf(t, df) for t in ts])
    assert np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c + c[::-1], 1.0, atol=1e-13)


def test_against_scipy():
  sp = pytest.importorskip("scipy.stats")
  for df in range(1, 41):
    for p in (0.6, 0.9, 0.975, 0.995, 0.9999):
      assert stats.t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-9)
    for t in (0.1, 1.5, 4.0):
      assert stats.t_two_sided_p(t, df) == pytest.approx(2 * sp.t.sf(t, df), rel=1e-9)


def test_bad_degrees_of_freedom():
  for df in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="degrees of freedom"):
      stats.t_cdf(0.3, df)
  with pytest.raises(ValueError, match="p must be in"):
    stats.t_quantile(1.0, 3)


def test_holm_by_hand():
  # m = 3: sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06).
  np.testing.assert_allclose(stats.holm_adjust([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  # Capped at 1; nan left out of the family (m = 2).
  np.testing.assert_allclose(stats.holm_adjust([0.6, np.nan, 0.02]), [0.6, np.nan, 0.04])
  np.testing.assert_allclose(stats.holm_adjust([0.7, 0.9]), [1.0, 1.0])


def test_paired_comparison_by_hand():
  # d = 1..5: mean 3, s = sqrt(2.5), se = sqrt(0.5); t = 3 / sqrt(0.5).
  x = {s: 10.0 + d for s, d in enumerate([1, 2, 3, 4, 5])}
  ref = {s: 10.0 for s in range(5)}
  r = stats.paired_comparison(x, ref)
  assert r["n"] == 5 and r["mean"] == pytest.approx(3.0)
  assert r["std"] == pytest.approx(math.sqrt(2.5))
  half = 2.7764451 * math.sqrt(0.5)  # published t_{0.975, 4}
  assert r["ci95"] == pytest.approx((3 - half, 3 + half), rel=1e-7)
  # p for df = 4 (A&S 26.7.4): P(|T| <= t) = sin(theta) (1 + cos^2(theta) / 2).
  theta = math.atan((3 / math.sqrt(0.5)) / 2)
  p = 1 - math.sin(theta) * (1 + 0.5 * math.cos(theta) ** 2)
  assert r["p"] == pytest.approx(p, rel=1e-10)
  assert (r["wins"], r["losses"], r["ties"]) == (5, 0, 0)
  # Lower is better: the same differences are losses.
  r = stats.paired_comparison(x, ref, higher_is_better=False)
  assert (r["wins"], r["losses"]) == (0, 5)
  # d = 0.01, 0.02, 0.03: mean 0.02, s = 0.01, half-width t_{0.975,2} 0.01 / sqrt(3).
  r = stats.paired_comparison([0.01, 0.02, 0.03], [0.0, 0.0, 0.0])
  half = 4.3026527 * 0.01 / math.sqrt(3)
  assert r["ci95"] == pytest.approx((0.02 - half, 0.02 + half), rel=1e-6)


def test_pairs_only_common_finite_seeds():
  r = stats.paired_comparison({0: 1.0, 1: 2.0, 2: math.nan, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 1.0})
  assert r["n"] == 2 and r["mean"] == pytest.approx(0.75)
  r = stats.paired_comparison({0: 1.0}, {0: 0.0})
  assert r["n"] == 1 and math.isnan(r["p"]) and math.isnan(r["ci95"][0])


def test_compare_to_reference_decisions():
  ref = {s: 0.8 for s in range(5)}
  up = {s: 0.8 + 0.01 * (s + 1) for s in range(5)}  # d = 0.01..0.05, p = 0.0132
  down = {s: 0.8 - 0.01 * (s + 1) for s in range(5)}
  noisy = {s: 0.8 + v for s, v in enumerate([0.01, -0.02, 0.015, -0.01, 0.004])}
  short = {0: 0.9}
  values = {"mean": ref, "up": up, "down": down, "noisy": noisy, "short": short}
  res = {r.method: r for r in stats.compare_to_reference(values, "mean")}
  assert set(res) == {"up", "down", "noisy", "short"}
  p = res["up"].p
  assert res["down"].p == pytest.approx(p)
  # Holm over m = 3 (short has one seed): the two smallest p get 3 p and max(3 p, 2 p).
  assert res["up"].m == 3
  assert min(res["up"].p_holm, res["down"].p_holm) == pytest.approx(3 * p)
  assert max(res["up"].p_holm, res["down"].p_holm) == pytest.approx(3 * p)
  assert res["up"].decision == "better" and res["down"].decision == "worse"
  assert res["noisy"].decision == "tie" and res["short"].decision == "n/a"
  assert res["up"].wins == 5 and res["down"].losses == 5
  # The Holm-level interval excludes zero exactly when the decision is not a tie,
  # and is wider than the 95% interval.
  for r in res.values():
    if r.decision == "n/a":
      continue
    lo, hi = r.ci_holm
    assert (lo > 0 or hi < 0) == (r.decision != "tie")
    assert lo <= r.ci95[0] + 1e-15 and hi >= r.ci95[1] - 1e-15
  # Lower is better (e.g. RMSE): the same data flip the decisions.
  res = {r.method: r for r in stats.compare_to_reference(values, "mean", higher_is_better=False)}
  assert res["up"].decision == "worse" and res["down"].decision == "better"


def test_holm_interval_level_at_first_step():
  """The smallest p-value's interval is the t-interval at level 1 - alpha / m."""
  sp = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  ref = {s: 0.0 for s in range(6)}
  values = {"ref": ref}
  for k in range(4):
    values[f"m{k}"] = {s: float(v) for s, v in enumerate(rng.normal(0.02 * k, 0.01, 6))}
  res = stats.compare_to_reference(values, "ref")
  first = min(res, key=lambda r: r.p)
  q = sp.t.ppf(1 - 0.05 / (2 * 4), 5)
  half = q * first.std / math.sqrt(6)
  assert first.ci_holm == pytest.approx((first.mean - half, first.mean + half), rel=1e-8)


def test_degenerate_zero_spread():
  values = {"ref": {0: 1.0, 1: 1.0, 2: 1.0}, "same": {0: 1.0, 1: 1.0, 2: 1.0}}
  values["shift"] = {0: 1.5, 1: 1.5, 2: 1.5}
  res = {r.method: r for r in stats.compare_to_reference(values, "ref")}
  assert res["same"].decision == "tie" and res["same"].ties == 3
  assert res["shift"].decision == "better" and res["shift"].ci_holm == (0.5, 0.5)
  with pytest.raises(KeyError):
    stats.compare_to_reference(values, "missing")
