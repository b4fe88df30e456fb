"""COSMOS (Ruchte and Grabocka, ICDM 2021) as a loss-only weighting: the
gradient of torchjd's COSMOS scalarizer and a NumPy formula."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def cosmos_np(l, r, lam):
  nr, nl = np.linalg.norm(r), np.linalg.norm(l)
  return r - lam * (r / (nr * nl) - (r @ l) * l / (nr * nl**3))


@pytest.mark.torchjd
def test_cosmos_matches_torchjd_gradient():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import COSMOS

  rng = np.random.default_rng(0)
  for t, lam in [(2, 1.0), (3, 8.0), (5, 0.01)]:
    g, l = rand_grads(rng, t), rng.uniform(0.2, 2.0, t)
    r = rng.dirichlet(np.ones(t))
    values = torch.tensor(l, requires_grad=True)
    (w_t,) = torch.autograd.grad(COSMOS(lam, torch.tensor(r))(values), values)
    np.testing.assert_allclose(w_t.numpy(), cosmos_np(l, r, lam), rtol=1e-10)
    (u,), _ = update_of(m.cosmos(r, lam), [g], [l])
    np.testing.assert_allclose(u, w_t.numpy() @ g, rtol=1e-9)


def test_cosmos_extreme_losses_finite_and_preference_at_update():
  r = jnp.array([0.3, 0.7])
  for scale in (1e-30, 1e30):
    w = m.cosmos_weights(scale * jnp.array([1.0, 2.0]), preference=r, penalty=1.0)
    assert bool(jnp.all(jnp.isfinite(w)))
  tx = m.cosmos(penalty=0.5)
  l = jnp.array([1.0, 3.0])
  w, _ = gj.task_weights(tx, None, tx.init(None), task_losses=l, preference=r)
  np.testing.assert_allclose(w, cosmos_np(np.asarray(l), np.asarray(r), 0.5), rtol=1e-5)
  w, _ = gj.task_weights(tx, None, tx.init(None), task_losses=l, preference=None)
  np.testing.assert_allclose(w, cosmos_np(np.asarray(l), np.ones(2) / 2, 0.5), rtol=1e-5)
  with pytest.raises(ValueError, match="preference"):
    gj.task_weights(tx, None, tx.init(None), task_losses=l, preference=jnp.ones(3))


def test_cosmos_injectable_penalty():

  tx = gj.inject_hyperparams(m.cosmos)(preference=jnp.array([0.3, 0.7]), penalty=0.0)
  l = jnp.array([1.0, 3.0])
  w, _ = gj.task_weights(tx, None, tx.init(None), task_losses=l)
  np.testing.assert_allclose(w, [0.3, 0.7], rtol=1e-6)  # penalty 0: linear scalarization
