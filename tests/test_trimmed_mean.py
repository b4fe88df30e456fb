"""Coordinate-wise trimmed mean: torchjd's TrimmedMean, not a weighting,
validation, non-finite input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import params_of, rand_j, run, stacked, torch64

import gradcraft_jax as gj
from gradcraft_jax.methods import trimmed_mean


@pytest.mark.extras
@pytest.mark.parametrize("t,k,seed", [(1, 0, 0), (3, 1, 1), (6, 2, 2), (7, 3, 3)])
def test_matches_torchjd(t, k, seed):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, 11)
  ref = agg.TrimmedMean(trim_number=k)(torch64(j)).numpy()
  (out,), _ = run(trimmed_mean(k), [j], jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-12)
  (out32,), _ = run(trimmed_mean(k), [j])
  np.testing.assert_allclose(out32, ref, rtol=1e-5, atol=1e-6 * np.abs(j).max())


def test_not_a_weighting_and_validation():
  tx = trimmed_mean(1)
  j = np.ones((3, 8))
  with pytest.raises(TypeError):
    gj.task_weights(tx, stacked(j), tx.init(params_of(j)))
  with pytest.raises(ValueError, match="2 \\* trim_number \\+ 1"):
    run(trimmed_mean(2), [np.ones((4, 8))])
  with pytest.raises(ValueError, match="trim_number"):
    trimmed_mean(-1)


def test_nonfinite_input_gives_nan_update():
  j = np.arange(24.0).reshape(3, 8)
  j[2, 0] = np.inf  # would be trimmed, still reported
  (out,), _ = run(trimmed_mean(1), [j])
  assert np.all(np.isnan(out))


@pytest.mark.parametrize("t,k", [(2, 0), (5, 2), (9, 1), (16, 4), (33, 8), (70, 3)])
def test_selection_network_matches_sorted_numpy(t, k):
  """The elementwise selection network (T <= 64) and the sort (T > 64)
  against NumPy's sort, with ties."""
  rng = np.random.default_rng(t)
  x = rng.integers(-3, 4, size=(t, 40)).astype(np.float32)  # many ties
  x[:, :20] += rng.standard_normal((t, 20)).astype(np.float32)
  got = jax.jit(lambda g: gj.methods.trimmed_mean_combine(g, k))({"w": jnp.asarray(x)})["w"]
  want = np.sort(x.astype(np.float64), axis=0)[k : t - k].mean(0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
