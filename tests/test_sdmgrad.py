"""SDMGrad (Xiao et al., NeurIPS 2023): torchjd's SDMGradWeighting over
several steps (warm-started inner solver), the stacked_2= path, lambda."""

import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import rand_j, run, stacked, torch64

from gradcraft_jax.methods import sdmgrad


@pytest.mark.extras
@pytest.mark.parametrize("t,lam,lr", [(2, 0.3, 10.0), (4, 0.6, 1.0), (3, 0.0, 0.5)])
def test_matches_torchjd_over_steps(t, lam, lr):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(t)
  ref = agg.SDMGradWeighting(lr=lr, momentum=0.5, n_iter=20, lambda_=lam)
  j1s = [rand_j(rng, t, 9, spread=0.3) for _ in range(3)]
  j2s = [j + 0.3 * rng.standard_normal(j.shape) for j in j1s]
  extras = [{"stacked_2": b} for b in j2s]
  outs, states = run(sdmgrad(lam, lr=lr, num_tasks=t), j1s, jnp.float64, extras)
  for a, b, out in zip(j1s, j2s, outs):
    w = ref(torch64(a @ b.T)).numpy()
    np.testing.assert_allclose(out, w @ a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_large_lambda_tends_to_mean_and_validation():
  rng = np.random.default_rng(0)
  a = rand_j(rng, 3, 6)
  (out,), _ = run(sdmgrad(1e6, num_tasks=3), [a], extras=[{"stacked_2": stacked(a)}])
  np.testing.assert_allclose(out, a.mean(0), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="momentum"):
    sdmgrad(momentum=1.0, num_tasks=2)
  with pytest.raises(ValueError, match="num_iters"):
    sdmgrad(num_iters=0, num_tasks=2)
