"""Tests of gradcraft_jax.diagnostics against a plain NumPy loop over tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcraft_jax
from gradcraft_jax import diagnostics


def _flat(stacked):
  leaves = jax.tree_util.tree_leaves(stacked)
  t = leaves[0].shape[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)


def _ref(stacked):
  """Norms, cosines, conflict counts by a loop over pairs of flat vectors."""
  g = _flat(stacked)
  t = g.shape[0]
  norms = np.array([np.sqrt(np.dot(g[i], g[i])) for i in range(t)])
  cos = np.zeros((t, t))
  counts = np.zeros(t, np.int64)
  for i in range(t):
    for j in range(t):
      if norms[i] > 0 and norms[j] > 0:
        cos[i, j] = np.dot(g[i], g[j]) / (norms[i] * norms[j])
      if i != j and np.dot(g[i], g[j]) < 0:
        counts[i] += 1
  return norms, cos, counts


def _tree(seed, t, scale=1.0, zero_rows=()):
  rng = np.random.default_rng(seed)
  tree = {
    "a": rng.normal(size=(t, 4, 3)),
    "b": rng.normal(size=(t, 5)),
    "c": {"d": rng.normal(size=(t, 2, 2, 2))},
  }
  tree = jax.tree_util.tree_map(lambda x: x * scale, tree)
  for r in zero_rows:
    tree = jax.tree_util.tree_map(lambda x: x.copy(), tree)
    for leaf in jax.tree_util.tree_leaves(tree):
      leaf[r] = 0.0
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


@settings(deadline=None, max_examples=12)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(1, 7),
  log_scale=st.sampled_from([-10.0, -3.0, 0.0, 4.0, 10.0]),
)
def test_matches_numpy_loop(seed, t, log_scale):
  tree = _tree(seed, t, scale=10.0**log_scale)
  norms, cos, counts = _ref(tree)
  got = gradcraft_jax.diagnostics.gradient_stats(tree)
  np.testing.assert_allclose(got.norms, norms, rtol=1e-5)
  np.testing.assert_allclose(got.cosines, cos, atol=2e-6)
  np.testing.assert_allclose(gradcraft_jax.diagnostics.gradient_cosines(tree), cos, atol=2e-6)
  np.testing.assert_array_equal(got.num_conflicts, counts)
  np.testing.assert_array_equal(gradcraft_jax.diagnostics.conflict_counts(tree), counts)
  assert int(got.total_conflicting_pairs) == counts.sum() // 2
  assert got.num_conflicts.dtype == jnp.int32


def test_conflict_counts_from_gram_equals_from_stacked():
  tree = _tree(3, 5)
  gram = gradcraft_jax.gram_matrix(tree)
  np.testing.assert_array_equal(
    gradcraft_jax.diagnostics.conflict_counts(gram), gradcraft_jax.diagnostics.conflict_counts(tree)
  )
  np.testing.assert_array_equal(
    gradcraft_jax.diagnostics.conflict_counts(np.asarray(gram)),
    gradcraft_jax.diagnostics.conflict_counts(tree),
  )


def test_square_single_leaf_with_is_gram_false():
  g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two tasks, 2 params: (T, T)
  _, _, counts = _ref({"w": g})
  np.testing.assert_array_equal(gradcraft_jax.diagnostics.conflict_counts(g, is_gram=False), counts)


def test_zero_norm_tasks_give_zero_never_nan():
  tree = _tree(1, 4, zero_rows=(1, 3))
  got = gradcraft_jax.diagnostics.gradient_stats(tree)
  _, cos, counts = _ref(tree)
  assert np.all(np.isfinite(got.cosines))
  np.testing.assert_allclose(got.cosines, cos, atol=2e-6)
  assert np.all(np.asarray(got.cosines)[[1, 3]] == 0)
  np.testing.assert_array_equal(got.num_conflicts, counts)
  # All tasks zero.
  zero = jax.tree_util.tree_map(jnp.zeros_like, tree)
  got = gradcraft_jax.diagnostics.gradient_stats(zero)
  assert np.all(np.asarray(got.cosines) == 0)
  assert np.all(np.asarray(got.norms) == 0)
  assert int(got.total_conflicting_pairs) == 0


def test_properties_symmetric_unit_diagonal_bounded():
  tree = _tree(7, 6)
  c = np.asarray(gradcraft_jax.diagnostics.gradient_cosines(tree))
  np.testing.assert_allclose(c, c.T, atol=1e-7)
  np.testing.assert_allclose(np.diag(c), 1.0)
  assert np.all(np.abs(c) <= 1.0)
  # Cosines do not change under per-task positive rescaling.
  scales = jnp.array([1e-3, 1.0, 7.0, 1e3, 0.5, 2.0])
  scaled = jax.tree_util.tree_map(lambda x: x * scales.reshape((-1,) + (1,) * (x.ndim - 1)), tree)
  np.testing.assert_allclose(gradcraft_jax.diagnostics.gradient_cosines(scaled), c, atol=2e-6)


def test_non_finite_input_gives_non_finite_output():
  tree = _tree(2, 3)
  tree["b"] = tree["b"].at[0, 0].set(jnp.nan)
  got = gradcraft_jax.diagnostics.gradient_stats(tree)
  assert not np.all(np.isfinite(got.cosines))
  assert not np.all(np.isfinite(got.norms))


def test_jittable_and_float64():
  tree = _tree(4, 3)
  got = jax.jit(gradcraft_jax.diagnostics.gradient_stats)(tree)
  np.testing.assert_allclose(got.cosines, _ref(tree)[1], atol=2e-6)
  with jax.enable_x64(True):
    t64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
    c = gradcraft_jax.diagnostics.gradient_cosines(t64)
    assert c.dtype == jnp.float64
    np.testing.assert_allclose(c, _ref(t64)[1], atol=1e-12)


def test_bad_gram_shape_raises():
  with pytest.raises(ValueError):
    diagnostics.cosines_from_gram(jnp.zeros((2, 3)))
