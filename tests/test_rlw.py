"""RLW (Lin et al., TMLR 2022): weights are softmax of a standard normal draw
(checked by inverting the softmax and testing normality), fresh at every
update, and distributed like torchjd's Random weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import flat10, rand_grads, stacked10
from scipy import stats

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def draws(tx, t, n):
  """n successive weight vectors of the transform (through task_weights)."""
  state = tx.init(None)

  def one(state, _):
    w, state = gj.task_weights(tx, None, state, num_tasks=t)
    return state, w

  _, ws = jax.lax.scan(one, state, None, length=n)
  return np.asarray(ws, np.float64)


def test_rlw_update_is_weighted_sum_of_the_drawn_weights():
  rng = np.random.default_rng(0)
  t = 4
  tx = m.rlw(seed=3, num_tasks=t)
  state = tx.init(None)
  seen = []
  for _ in range(3):
    g = rand_grads(rng, t)
    w, _ = gj.task_weights(tx, stacked10(g, jnp.float32), state)
    u, state = jax.jit(tx.update)(stacked10(g, jnp.float32), state)
    assert np.all(np.asarray(w) > 0) and abs(float(jnp.sum(w)) - 1) < 1e-6
    np.testing.assert_allclose(flat10(u), np.asarray(w, np.float64) @ g, rtol=1e-5, atol=1e-6)
    seen.append(np.asarray(w))
  assert not np.allclose(seen[0], seen[1])  # a fresh draw at every update


def test_rlw_log_weights_are_centred_standard_normal():
  t, n = 3, 3000
  ws = draws(m.rlw(seed=0), t, n)
  logs = np.log(ws)
  centred = logs - logs.mean(axis=1, keepdims=True)  # z - mean(z), z ~ N(0, I)
  # each component of z - mean(z) is N(0, 1 - 1/T)
  z = centred[:, 0] / np.sqrt(1 - 1 / t)
  assert stats.kstest(z, "norm").pvalue > 1e-3
  np.testing.assert_allclose(ws.mean(axis=0), 1 / t, atol=0.02)


@pytest.mark.torchjd
def test_rlw_distributed_like_torchjd_random():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.aggregation import RandomWeighting

  t, n = 4, 3000
  torch.manual_seed(0)
  weighting = RandomWeighting()
  matrix = torch.zeros((t, 2), dtype=torch.float64)
  theirs = np.stack([weighting(matrix).numpy() for _ in range(n)])
  ours = draws(m.rlw(seed=1), t, n)
  # same law: two-sample KS test on the largest weight and on the first one
  assert stats.ks_2samp(ours.max(axis=1), theirs.max(axis=1)).pvalue > 1e-3
  assert stats.ks_2samp(ours[:, 0], theirs[:, 0]).pvalue > 1e-3


def test_rlw_seed_reproducible_and_injectable():
  a = draws(m.rlw(seed=5), 3, 4)
  b = draws(m.rlw(seed=5), 3, 4)
  np.testing.assert_array_equal(a, b)
  tx = gj.inject_hyperparams(m.rlw, static_args=("seed",))(seed=5)
  np.testing.assert_allclose(draws(tx, 3, 4), a, rtol=1e-6)
