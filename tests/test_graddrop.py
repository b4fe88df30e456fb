"""GradDrop (Chen et al., NeurIPS 2020): torchjd's GradDrop with the same
thresholds, a NumPy loop over tasks from Algorithm 1, leaks, randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import params_of, rand_j, run, stacked, torch64

import gradcraft_jax as gj
from gradcraft_jax.methods import graddrop, graddrop_combine


def thresholds(key, d, dtype):
  """The U that graddrop_combine draws for a one-leaf tree of width d."""
  return np.asarray(jax.random.uniform(jax.random.fold_in(key, 0), (d,), dtype))


def numpy_graddrop(j, u, leak=None, f=lambda p: p):
  """Algorithm 1, lines 10-15, one task at a time."""
  t = j.shape[0]
  leak = np.zeros(t) if leak is None else leak
  p = 0.5 * (1.0 + j.sum(0) / np.abs(j).sum(0))
  out = np.zeros(j.shape[1])
  for i in range(t):
    m = (f(p) > u) * (j[i] > 0) + (f(p) < u) * (j[i] < 0)
    out += (leak[i] + (1 - leak[i]) * m) * j[i]
  return out


@pytest.mark.extras
@pytest.mark.parametrize("t,seed", [(2, 0), (3, 1), (6, 2)])
def test_matches_torchjd_and_numpy_with_same_thresholds(t, seed, monkeypatch):
  torch = pytest.importorskip("torch")
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, 40)
  leak = rng.uniform(0, 0.5, t)
  key = jax.random.PRNGKey(seed)
  with jax.enable_x64(True):
    u = thresholds(key, 40, jnp.float64)
    out = np.asarray(graddrop_combine({"p": jnp.asarray(j)}, key, leak=jnp.asarray(leak))["p"])
  monkeypatch.setattr(torch, "rand", lambda *a, **k: torch64(u))
  ref = agg.GradDrop(leak=torch64(leak))(torch64(j)).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-12)
  np.testing.assert_allclose(out, numpy_graddrop(j, u, leak), rtol=1e-12)


def test_custom_f_and_same_signs():
  j = np.array([[1.0, -2.0, 3.0], [2.0, -1.0, 1.0]])
  (out,), _ = run(graddrop(), [j])  # no sign conflict: everything is kept
  np.testing.assert_allclose(out, j.sum(0), rtol=1e-6)
  key = jax.random.PRNGKey(3)
  j = np.random.default_rng(0).standard_normal((3, 16))
  out = np.asarray(graddrop_combine({"p": jnp.asarray(j)}, key, f=jnp.sqrt)["p"])
  u = thresholds(key, 16, jnp.float32)
  np.testing.assert_allclose(out, numpy_graddrop(j, u, f=np.sqrt), rtol=1e-5, atol=1e-6)


def test_state_key_advances_and_seed_reproducible():
  rng = np.random.default_rng(1)
  j = rng.standard_normal((3, 64))
  outs, states = run(graddrop(seed=5), [j, j])
  assert not np.allclose(outs[0], outs[1])  # new thresholds each step
  outs2, _ = run(graddrop(seed=5), [j, j])
  np.testing.assert_array_equal(outs[0], outs2[0])
  # expected value: E[out] = sum_i g_i * (P [g_i > 0] + (1 - P) [g_i < 0])
  keep_pos = 0.5 * (1 + j.sum(0) / np.abs(j).sum(0))
  exp = np.sum(np.where(j > 0, keep_pos, 1 - keep_pos) * j, 0)
  many, _ = run(graddrop(seed=0), [j] * 200)
  np.testing.assert_allclose(np.mean(many, 0), exp, atol=0.35)


def test_not_a_weighting_and_validation():
  tx = graddrop()
  j = np.ones((2, 8))
  with pytest.raises(TypeError):
    gj.task_weights(tx, stacked(j), tx.init(params_of(j)))
  with pytest.raises(ValueError, match="leak"):
    run(graddrop(leak=jnp.ones(3)), [j])
