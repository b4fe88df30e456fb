"""UPGrad (Quinton and Rey, 2024): projections onto the dual cone solved in
parameter space (cvxpy), torchjd's dual QP (quadprog), non-conflict, and
torchjd."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import apply, cos, random_jacobian, torch_agg

from gradcraft_jax.methods import upgrad


def upgrad_reference(j):
  """Mean over i of the Euclidean projection of g_i onto {x : J x >= 0},
  solved in parameter space (cvxpy), not via the dual."""
  cp = pytest.importorskip("cvxpy")
  t, d = j.shape
  projs = []
  for i in range(t):
    x = cp.Variable(d)
    cp.Problem(cp.Minimize(cp.sum_squares(x - j[i])), [j @ x >= 0]).solve()
    projs.append(x.value)
  return np.mean(projs, axis=0)


def quadprog_dual_weights(k, reg=0.0):
  """torchjd's dual QP with quadprog: v_i = argmin_{v >= e_i/T} v^T K v."""
  qpsolvers = pytest.importorskip("qpsolvers")
  pytest.importorskip("quadprog")
  t = k.shape[0]
  kn = k / np.trace(k) + reg * np.eye(t)
  vs = [
    qpsolvers.solve_qp(kn, np.zeros(t), -np.eye(t), -np.eye(t)[i] / t, solver="quadprog")
    for i in range(t)
  ]
  return np.sum(vs, axis=0)


def test_upgrad_no_conflict_is_mean():
  j = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 2.0]])
  np.testing.assert_allclose(apply(upgrad(), j), j.mean(0), rtol=1e-5)


@pytest.mark.extras
@pytest.mark.parametrize("t,d,seed", [(2, 5, 0), (3, 8, 1), (5, 20, 2), (6, 4, 3)])
def test_upgrad_matches_primal_projection(t, d, seed):
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, t, d, correlated=True)
  ref = upgrad_reference(j)
  np.testing.assert_allclose(apply(upgrad(), j), ref, atol=1e-4 * np.linalg.norm(j, axis=1).max())


@pytest.mark.extras
@pytest.mark.parametrize("t,seed", [(4, 0), (8, 1), (16, 2)])
def test_upgrad_matches_quadprog(t, seed):
  """Stated tolerance: update within 1e-3 * max ||g_i|| of quadprog's
  float64 solution (float32 solve; observed ~1e-4 at T=32)."""
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, t, 3 * t, correlated=True)
  k = j @ j.T
  for reg in (0.0, 1e-4):
    ref = quadprog_dual_weights(k + 1e-12 * np.trace(k) * np.eye(t), reg) @ j
    out = apply(upgrad(reg_eps=reg), j)
    np.testing.assert_allclose(out, ref, atol=1e-3 * np.linalg.norm(j, axis=1).max())


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 6))
def test_upgrad_nonconflicting(seed, t):
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, t, int(rng.integers(1, 3 * t)))
  d = apply(upgrad(), j)
  norms = np.linalg.norm(j, axis=1)
  assert np.all(j @ d >= -1e-4 * norms * norms.max())


@pytest.mark.torchjd
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchjd_upgrad(seed):
  ta = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, 5, 30, correlated=True)
  ref = torch_agg(ta.UPGrad(), j)
  scale = np.linalg.norm(j, axis=1).max()
  # Same QP (torchjd regularises K / tr K by 1e-4 I): tight.
  np.testing.assert_allclose(apply(upgrad(reg_eps=1e-4), j), ref, atol=1e-4 * scale)
  # Unregularised (default): close, same direction.
  out = apply(upgrad(), j)
  assert cos(out, ref) > 0.999
