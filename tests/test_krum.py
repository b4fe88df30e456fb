"""Krum / Multi-Krum: torchjd's Krum weights and vector, a NumPy reference
of the paper's (squared-distance) score, validation, order."""

import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import rand_j, run, torch64

from gradcraft_jax.methods import krum, krum_weights


def numpy_krum(j, f, m, squared):
  t = j.shape[0]
  dist = np.array([[np.sum((a - b) ** 2) for b in j] for a in j])
  if not squared:
    dist = np.sqrt(dist)
  scores = [np.sum(np.sort(np.delete(dist[i], i))[: t - f - 2]) for i in range(t)]
  sel = np.argsort(scores, kind="stable")[:m]
  return j[sel].mean(0)


@pytest.mark.extras
@pytest.mark.parametrize("t,f,m,seed", [(3, 0, 1, 0), (5, 1, 1, 1), (7, 2, 3, 2), (8, 1, 4, 3)])
def test_matches_torchjd(t, f, m, seed):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, 6, spread=0.3)
  j[-1] *= 30.0  # an outlier
  ref_w = agg.KrumWeighting(n_byzantine=f, n_selected=m)(torch64(j @ j.T)).numpy()
  with __import__("jax").enable_x64(True):
    w = np.asarray(krum_weights(jnp.asarray(j @ j.T), n_byzantine=f, n_selected=m))
  np.testing.assert_allclose(w, ref_w)
  ref = agg.Krum(n_byzantine=f, n_selected=m)(torch64(j)).numpy()
  (out,), _ = run(krum(f, m), [j], jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-10)
  np.testing.assert_allclose(out, numpy_krum(j, f, m, squared=False), rtol=1e-10)


def test_squared_score_matches_numpy():
  rng = np.random.default_rng(4)
  for _ in range(5):
    j = rand_j(rng, 6, 5, spread=0.5)
    (out,), _ = run(krum(1, 2, squared=True), [j], jnp.float64)
    np.testing.assert_allclose(out, numpy_krum(j, 1, 2, squared=True), rtol=1e-10)


def test_too_few_tasks_raise():
  with pytest.raises(ValueError, match="n_byzantine \\+ 3"):
    run(krum(1), [np.ones((3, 4))])
  with pytest.raises(ValueError, match="n_byzantine \\+ 3"):
    run(krum(0), [np.ones((1, 4))])
  with pytest.raises(ValueError, match="n_selected"):
    krum(0, 0)


def test_permutation_equivariant_for_distinct_scores():
  rng = np.random.default_rng(5)
  j = rand_j(rng, 5, 7)
  perm = rng.permutation(5)
  (a,), _ = run(krum(1, 2), [j], jnp.float64)
  (b,), _ = run(krum(1, 2), [j[perm]], jnp.float64)
  np.testing.assert_allclose(a, b, rtol=1e-12)
