"""MoCo (Fernando et al., ICLR 2023): a NumPy loop of Algorithm 1 over
several steps, the T x params state, guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import params_of, rand_j, run, stacked

import gradcraft_jax as gj
from gradcraft_jax.methods import moco


def simplex(y):
  """Projection onto the simplex by bisection on the threshold (an
  independent algorithm from the sort-based one of the library)."""
  lo, hi = y.min() - 1.0, y.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if np.maximum(y - mid, 0).sum() > 1:
      lo = mid
    else:
      hi = mid
  return np.maximum(y - 0.5 * (lo + hi), 0)


def numpy_moco(js, beta, gamma, rho):
  t, d = js[0].shape
  y, lam, outs = np.zeros((t, d)), np.full(t, 1.0 / t), []
  for g in js:
    y = y - beta * (y - g)
    lam = simplex(lam - gamma * (y @ y.T + rho * np.eye(t)) @ lam)
    outs.append(lam @ y)
  return outs, y, lam


@pytest.mark.parametrize("t,beta,gamma,rho", [(2, 0.5, 0.1, 0.0), (4, 0.2, 0.05, 0.1)])
def test_matches_numpy_algorithm(t, beta, gamma, rho):
  rng = np.random.default_rng(t)
  base = rand_j(rng, t, 10, spread=0.3)
  js = [base + 0.3 * rng.standard_normal(base.shape) for _ in range(5)]
  ref_outs, y, lam = numpy_moco(js, beta, gamma, rho)
  outs, states = run(moco(beta, gamma, rho, num_tasks=t), js, jnp.float64)
  for o, r in zip(outs, ref_outs):
    np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)  # float32 weights in the state
  np.testing.assert_allclose(states[-1].weights, lam, rtol=1e-5, atol=1e-7)
  tracked = np.concatenate(
    [states[-1].tracked["a"].reshape(t, -1), states[-1].tracked["b"].reshape(t, -1)], 1
  )
  np.testing.assert_allclose(tracked, y, rtol=1e-12)


def test_state_is_t_copies_of_params_and_not_a_weighting():
  j = np.ones((3, 12))
  tx = moco(num_tasks=3)
  state = tx.init(params_of(j))
  sizes = [x.size for x in jax.tree_util.tree_leaves(state.tracked)]
  assert sum(sizes) == 3 * 12
  with pytest.raises(TypeError):
    gj.task_weights(tx, stacked(j), state)


def test_nonfinite_keeps_state():
  j = np.ones((2, 8))
  tx = moco(num_tasks=2)
  _, (s1,) = run(tx, [j])
  bad = j.copy()
  bad[0, 0] = np.nan
  with jax.enable_x64(False):
    state = jax.tree_util.tree_map(jnp.asarray, s1)
    upd, s2 = jax.jit(tx.update)(stacked(bad), state)
  assert np.isnan(np.asarray(upd["a"])).all()
  jax.tree_util.tree_map(np.testing.assert_array_equal, s2, state)
