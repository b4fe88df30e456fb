"""Constant weights: torchjd's Constant and Sum aggregators, and mean."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax as gj
import gradcraft_jax.methods as m


@pytest.mark.torchjd
def test_constant_and_sum_match_torchjd():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.aggregation import Constant, Sum

  rng = np.random.default_rng(0)
  g = rand_grads(rng, 3)
  c = np.array([0.5, -1.0, 2.0])
  (u,), _ = update_of(m.constant(c), [g])
  np.testing.assert_allclose(u, Constant(torch.tensor(c))(torch.tensor(g)).numpy(), rtol=1e-10)
  (u,), _ = update_of(m.constant(np.ones(3)), [g])
  np.testing.assert_allclose(u, Sum()(torch.tensor(g)).numpy(), rtol=1e-10)


def test_constant_is_mean_injectable_and_checked():
  rng = np.random.default_rng(1)
  g = rand_grads(rng, 4)
  (u,), _ = update_of(m.constant(np.full(4, 0.25)), [g])
  (v,), _ = update_of(m.mean(), [g])
  np.testing.assert_allclose(u, v, rtol=1e-12)
  tx = gj.inject_hyperparams(m.constant)(weights=jnp.array([1.0, 2.0]))
  w, _ = gj.task_weights(tx, None, tx.init(None), num_tasks=2)
  np.testing.assert_allclose(w, [1.0, 2.0])
  (u,), _ = update_of(m.constant(), [g])  # default: ones, the sum
  np.testing.assert_allclose(u, g.sum(0), rtol=1e-12)
  with pytest.raises(ValueError, match="num_tasks"):
    m.constant(jnp.ones(3), num_tasks=2)
  with pytest.raises(ValueError, match="1-D"):
    m.constant(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="tasks"):
    tx = m.constant(jnp.ones(2))
    tx.update({"w": jnp.ones((3, 2))}, tx.init(None))
