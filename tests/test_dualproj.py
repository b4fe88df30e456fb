"""DualProj: the projection of the mean onto the dual cone, against a
parameter-space projection (cvxpy), torchjd's DualProj, non-conflict."""

import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import rand_j, run, torch64

from gradcraft_jax.methods import dualproj


def primal_projection(j, preference=None):
  cp = pytest.importorskip("cvxpy")
  t, d = j.shape
  target = (np.full(t, 1.0 / t) if preference is None else preference) @ j
  x = cp.Variable(d)
  cp.Problem(cp.Minimize(cp.sum_squares(x - target)), [j @ x >= 0]).solve()
  return x.value


@pytest.mark.extras
@pytest.mark.parametrize("t,d,seed", [(2, 4, 0), (3, 8, 1), (5, 12, 2), (6, 5, 3)])
def test_matches_primal_projection(t, d, seed):
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, d, correlated=True)
  j[0] = -j[1] * 0.5 + 0.1 * j[0]  # make a conflict likely
  ref = primal_projection(j)
  (out,), _ = run(dualproj(), [j])
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.linalg.norm(j, axis=1).max())
  assert np.all(j @ out >= -1e-4 * np.linalg.norm(j, axis=1) ** 2)


@pytest.mark.extras
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchjd_with_its_ridge(seed):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = rand_j(rng, 4, 10, correlated=True)
  j[1] = -0.7 * j[0] + 0.2 * j[1]
  ref = agg.DualProj()(torch64(j)).numpy()
  (out,), _ = run(dualproj(reg_eps=1e-4), [j], jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_no_conflict_is_mean_and_preference():
  j = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 2.0]])
  (out,), _ = run(dualproj(), [j])
  np.testing.assert_allclose(out, j.mean(0), rtol=1e-5)
  preference = np.array([0.7, 0.2, 0.1])
  (out,), _ = run(dualproj(preference=jnp.asarray(preference)), [j])
  np.testing.assert_allclose(out, preference @ j, rtol=1e-5)
