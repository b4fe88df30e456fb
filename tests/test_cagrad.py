"""CAGrad (Liu et al., NeurIPS 2021): hand-checked values, the paper's
Algorithm 1 solved exactly on J (cvxpy), the optimal worst improvement, and
torchjd."""

import numpy as np
import pytest
from method_helpers import apply, random_jacobian, torch_agg

from gradcraft_jax.methods import cagrad


def cagrad_reference(j, c):
  """Liu et al. Alg. 1 on J: min_w g_w.g0 + sqrt(phi)||g_w|| (cvxpy)."""
  cp = pytest.importorskip("cvxpy")
  t = j.shape[0]
  g0 = j.mean(0)
  sqrt_phi = c * np.linalg.norm(g0)
  w = cp.Variable(t)
  prob = cp.Problem(
    cp.Minimize((j @ g0) @ w + sqrt_phi * cp.norm(j.T @ w)), [w >= 0, cp.sum(w) == 1]
  )
  prob.solve()
  gw = j.T @ w.value
  return g0 + sqrt_phi / np.linalg.norm(gw) * gw, prob.value, g0, sqrt_phi


def test_cagrad_hand_checked():
  # g1, g2 orthonormal: by symmetry w = (1/2, 1/2), g_w = g0 = (1/2, 1/2),
  # d = g0 + c ||g0|| g0 / ||g0|| = (1 + c) g0.
  d = apply(cagrad(0.4), np.eye(2))
  np.testing.assert_allclose(d, [0.7, 0.7], atol=1e-5)
  d = apply(cagrad(0.4, rescale=True), np.eye(2))
  np.testing.assert_allclose(d, np.array([0.7, 0.7]) / 1.16, atol=1e-5)


def test_cagrad_c0_is_mean():
  rng = np.random.default_rng(0)
  j = random_jacobian(rng, 5, 20)
  np.testing.assert_allclose(apply(cagrad(0.0), j), j.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.extras
@pytest.mark.parametrize(
  "t,c,seed", [(2, 0.4, 0), (3, 0.4, 1), (3, 0.9, 2), (2, 2.0, 3), (3, 0.1, 4)]
)
def test_cagrad_matches_reference_small(t, c, seed):
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, t, 30, correlated=seed % 2 == 0)
  ref, _, _, _ = cagrad_reference(j, c)
  d = apply(cagrad(c), j)
  np.testing.assert_allclose(d, ref, atol=2e-3 * np.linalg.norm(ref))


@pytest.mark.extras
@pytest.mark.parametrize("t,c,seed", [(6, 0.4, 0), (8, 0.9, 1), (16, 0.4, 2)])
def test_cagrad_optimal_value(t, c, seed):
  """d lies on the ball ||d - g0|| = c||g0|| and attains the optimal worst
  improvement max_d min_i <g_i, d> (= the cvxpy optimum) up to 1e-3 ||g0||^2
  (the argmin in w is ill-determined when the objective is flat, the value
  is not)."""
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, t, 50, correlated=True)
  _, opt, g0, sqrt_phi = cagrad_reference(j, c)
  d = apply(cagrad(c), j)
  np.testing.assert_allclose(np.linalg.norm(d - g0), sqrt_phi, rtol=1e-4)
  assert (j @ d).min() >= opt - 1e-3 * (g0 @ g0)


@pytest.mark.torchjd
@pytest.mark.parametrize("seed,c", [(0, 0.4), (1, 0.9), (2, 0.1)])
def test_torchjd_cagrad(seed, c):
  ta = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, 3, 20, correlated=True)
  ref = torch_agg(ta.CAGrad(c=c), j)  # no 1/(1+c^2): same convention
  np.testing.assert_allclose(apply(cagrad(c), j), ref, atol=2e-3 * np.linalg.norm(ref))
