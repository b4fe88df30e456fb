"""MGDA: hand-checked min-norm points, the KKT conditions, the paper's
Frank-Wolfe (Algorithm 2) run long, an exact QP (cvxpy), and torchjd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import (
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m


def mgda_fw_np(g, iters=20000):
  """Algorithm 2 of Sener and Koltun on the vectors (many iterations)."""
  t = len(g)
  w = np.full(t, 1.0 / t)
  for _ in range(iters):
    v = w @ g
    j = np.argmin(g @ v)
    a, b, c = v @ g[j], v @ v, g[j] @ g[j]
    if c <= a:
      gamma = 1.0
    elif b <= a:
      gamma = 0.0
    else:
      gamma = (b - a) / (b + c - 2 * a)
    w = (1 - gamma) * w
    w[j] += gamma
  return w @ g


def test_mgda_hand_checked():
  # two orthogonal unit vectors: the midpoint
  (u,), _ = update_of(m.mgda(), [np.eye(2, 10)])
  np.testing.assert_allclose(u[:2], [0.5, 0.5], atol=1e-12)
  # g3 = (1, 1)/2 lies inside the hull of e1, e2 and is the min-norm point
  g = np.zeros((3, 10))
  g[0, 0], g[1, 1], g[2, :2] = 1, 1, [0.5, 0.5]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u[:2], [0.5, 0.5], atol=1e-12)
  # one gradient is the min-norm point (the other projects beyond it)
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 0], [2, 1]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u[:2], [1, 0], atol=1e-12)
  # opposite gradients: the origin
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 2], [-3, -6]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u, 0, atol=1e-12)


_weights = jax.jit(m.mgda_weights)  # one compile per task count and dtype


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 8), d=st.integers(2, 10))
def test_mgda_kkt_float64(seed, t, d):
  """The min-norm point v of the hull satisfies <v, g_i> >= ||v||^2, with
  equality on the support of the weights."""
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t, d)
  if seed % 3 == 0:
    g[1] = -2.0 * g[0]
  with jax.enable_x64(True):
    w = np.asarray(_weights(jnp.asarray(g @ g.T)))
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
  v = w @ g
  scale = np.max(np.sum(g * g, 1))
  slack = (g @ v - v @ v) / scale
  assert np.all(slack >= -1e-9), slack
  assert np.all(np.abs(slack[w > 1e-9]) <= 1e-9), slack


@pytest.mark.parametrize("seed", range(4))
def test_mgda_matches_frank_wolfe_reference(seed):
  """Against the paper's Frank-Wolfe (Algorithm 2) run for many iterations:
  FW converges sublinearly, so the library's exact solver must be at least
  as good in objective and close to it."""
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, 4, 10)
  (u,), _ = update_of(m.mgda(), [g])
  ref = mgda_fw_np(g)
  assert u @ u <= ref @ ref + 1e-12
  np.testing.assert_allclose(u, ref, atol=1e-3 * np.abs(g).max())


@pytest.mark.extras
def test_mgda_matches_cvxpy():
  cp = pytest.importorskip("cvxpy")
  rng = np.random.default_rng(5)
  for _ in range(5):
    g = rand_grads(rng, 5, 8)
    x = cp.Variable(5)
    cp.Problem(cp.Minimize(cp.sum_squares(g.T @ x)), [x >= 0, cp.sum(x) == 1]).solve()
    (u,), _ = update_of(m.mgda(), [g])
    np.testing.assert_allclose(u, g.T @ x.value, atol=1e-5 * np.abs(g).max())


@pytest.mark.torchjd
def test_torchjd_mgda():
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  rng = np.random.default_rng(11)
  for t in [2, 3, 5]:
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    ref_mgda = agg.MGDA(epsilon=1e-12, max_iters=20000)(j).numpy()
    (u,), _ = update_of(m.mgda(), [g])
    np.testing.assert_allclose(u, ref_mgda, atol=1e-5 * np.abs(g).max())
