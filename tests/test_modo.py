"""MoDo (Chen et al., NeurIPS 2023): torchjd's MoDoWeighting over several
steps, the second batch as stacked_2= or cross_gram=, task_weights, guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import params_of, rand_j, run, stacked, torch64

import gradcraft_jax as gj
from gradcraft_jax.methods import modo
from gradcraft_jax.methods._cross_batch import project_simplex


@pytest.mark.extras
def test_simplex_projection_matches_torchjd():
  pytest.importorskip("torchjd")
  from torchjd.aggregation._utils.simplex import project_onto_simplex

  rng = np.random.default_rng(0)
  for t in (1, 2, 5, 9):
    for _ in range(5):
      y = rng.standard_normal(t) * 3
      ref = project_onto_simplex(torch64(y)).numpy()
      with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(project_simplex(jnp.asarray(y))), ref, atol=1e-12)


@pytest.mark.extras
@pytest.mark.parametrize("t,gamma,rho", [(2, 0.1, 0.0), (4, 0.05, 0.1)])
def test_matches_torchjd_over_steps(t, gamma, rho):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(t)
  ref_w = agg.MoDoWeighting(gamma=gamma, rho=rho)
  j1s = [rand_j(rng, t, 9, spread=0.3) for _ in range(4)]
  j2s = [j + 0.3 * rng.standard_normal(j.shape) for j in j1s]
  extras = [{"stacked_2": b} for b in j2s]
  outs, states = run(modo(gamma, rho, num_tasks=t), j1s, jnp.float64, extras)
  for a, b, out, st in zip(j1s, j2s, outs, states):
    w = ref_w(torch64(a @ b.T)).numpy()
    np.testing.assert_allclose(st.weights, w, rtol=1e-5, atol=1e-7)  # float32 state
    np.testing.assert_allclose(out, w @ a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_cross_gram_argument_and_task_weights_agree():
  rng = np.random.default_rng(1)
  a, b = rand_j(rng, 3, 8), rand_j(rng, 3, 8)
  tx = modo(0.2, num_tasks=3)
  (o1,), _ = run(tx, [a], extras=[{"stacked_2": stacked(b)}])
  (o2,), _ = run(tx, [a], extras=[{"cross_gram": jnp.asarray(a @ b.T, jnp.float32)}])
  np.testing.assert_allclose(o1, o2, rtol=1e-5)
  w, _ = gj.task_weights(tx, None, tx.init(None), cross_gram=a @ b.T, num_tasks=3)
  w2, _ = gj.task_weights(tx, stacked(a), tx.init(None), stacked_2=stacked(b))
  np.testing.assert_allclose(np.asarray(w), np.asarray(w2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w) @ a, o1, rtol=1e-5, atol=1e-6)


def test_missing_second_batch_and_nonfinite_cross_gram():
  tx = modo(num_tasks=2)
  j = np.ones((2, 8))
  with pytest.raises(ValueError, match="second, independent mini-batch"):
    tx.update(stacked(j), tx.init(None))
  with pytest.raises(ValueError, match="cross_gram has shape"):
    tx.update(stacked(j), tx.init(None), cross_gram=jnp.ones((3, 3)))
  with pytest.raises(TypeError, match="num_tasks"):
    modo()  # the state needs T
  state = tx.init(params_of(j))
  upd, new = tx.update(stacked(j), state, cross_gram=jnp.array([[1.0, jnp.nan], [0.0, 1.0]]))
  assert not np.all(np.isfinite(np.asarray(upd["b"])))
  np.testing.assert_array_equal(np.asarray(new.weights), np.asarray(state.weights))
