"""ConFIG (Liu et al., ICLR 2025): torchjd's ConFIG (pseudo-inverse of the
unit Jacobian, in parameter space), the equal-cosine property, scale."""

import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import rand_j, run, torch64

from gradcraft_jax.methods import conflict_free


def numpy_config(j, preference=None):
  """Equation 2 of the paper in parameter space."""
  t = j.shape[0]
  norms = np.linalg.norm(j, axis=1, keepdims=True)
  u = np.where(norms > 0, j / np.where(norms > 0, norms, 1.0), 0.0)
  b = np.linalg.pinv(u) @ (np.ones(t) if preference is None else preference)
  bh = b / np.linalg.norm(b)
  return np.sum(j @ bh) * bh


@pytest.mark.extras
@pytest.mark.parametrize("t,d,seed", [(2, 5, 0), (3, 10, 1), (5, 20, 2), (8, 30, 3)])
def test_matches_torchjd_and_numpy(t, d, seed):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, d, correlated=True)
  ref = agg.ConFIG()(torch64(j)).numpy()
  np.testing.assert_allclose(numpy_config(j), ref, rtol=1e-8)
  (out64,), _ = run(conflict_free(), [j], jnp.float64)
  np.testing.assert_allclose(out64, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
  (out32,), _ = run(conflict_free(), [j])
  np.testing.assert_allclose(out32, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.extras
def test_preference_vector_matches_torchjd():
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(4)
  j = rand_j(rng, 3, 7)
  preference = np.array([1.0, 2.0, 0.5])
  ref = agg.ConFIG(pref_vector=torch64(preference))(torch64(j)).numpy()
  (out,), _ = run(conflict_free(preference=jnp.asarray(preference)), [j], jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-8)


def test_equal_cosines_no_conflict_when_independent():
  rng = np.random.default_rng(5)
  j = rand_j(rng, 4, 9, correlated=True)
  (d,), _ = run(conflict_free(), [j], jnp.float64)
  cos = j @ d / (np.linalg.norm(j, axis=1) * np.linalg.norm(d))
  np.testing.assert_allclose(cos, cos[0], rtol=1e-8)
  assert cos[0] > 0


def test_dependent_and_zero_gradients():
  """g_2 = -g_1: the least-squares direction is orthogonal to both (as the
  paper's pseudo-inverse); a zero gradient drops out."""
  j = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  (d,), _ = run(conflict_free(), [j], jnp.float64)
  np.testing.assert_allclose(d, numpy_config(j), atol=1e-12)
  j0 = np.array([[1.0, 0.0], [0.0, 0.0]])
  (d0,), _ = run(conflict_free(), [j0], jnp.float64)
  np.testing.assert_allclose(d0, numpy_config(j0), atol=1e-12)


def test_one_homogeneous():
  rng = np.random.default_rng(6)
  j = rand_j(rng, 3, 6)
  (a,), _ = run(conflict_free(), [j], jnp.float64)
  (b,), _ = run(conflict_free(), [1e6 * j], jnp.float64)
  np.testing.assert_allclose(b, 1e6 * a, rtol=1e-9)
