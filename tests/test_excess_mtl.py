"""ExcessMTL (He et al., ICML 2024): torchjd's ExcessMTL over several steps,
with and without warm-up; the T x params state; guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import params_of, rand_j, run, stacked, torch64

import gradcraft_jax as gj
from gradcraft_jax.methods import excess_mtl


@pytest.mark.extras
@pytest.mark.parametrize("t,eta,warm", [(2, 1.0, 0), (3, 0.5, 2), (5, 2.0, 1)])
def test_matches_torchjd_over_steps(t, eta, warm):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(t)
  ref = agg.ExcessMTL(robust_step_size=eta, n_warmup_steps=warm)
  js = [rand_j(rng, t, 10, spread=0.5) for _ in range(5)]
  outs, states = run(excess_mtl(eta, warm, num_tasks=t), js, jnp.float64)
  for j, out, st in zip(js, outs, states):
    r = ref(torch64(j)).numpy()
    np.testing.assert_allclose(out, r, rtol=1e-5, atol=1e-6 * np.abs(j).max())
    np.testing.assert_allclose(st.weights, ref.weighting._weights.numpy(), rtol=1e-5)


def test_state_size_not_a_weighting_and_nonfinite():
  j = np.ones((3, 12))
  tx = excess_mtl(num_tasks=3)
  state = tx.init(params_of(j))
  assert sum(x.size for x in jax.tree_util.tree_leaves(state.sq_sum)) == 3 * 12
  with pytest.raises(TypeError):
    gj.task_weights(tx, stacked(j), state)
  bad = j.copy()
  bad[1, 3] = np.inf
  upd, new = jax.jit(tx.update)(stacked(bad), state)
  assert np.isnan(np.asarray(upd["b"])).all()
  jax.tree_util.tree_map(np.testing.assert_array_equal, new, state)
