"""PBI (Zhang and Li, 2007) as a loss-only weighting: the gradient of
torchjd's PBI scalarizer and a NumPy formula of the paper's d1 + theta d2."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def pbi_np(l, w, theta, z):
  f = l - z
  wh = w / np.linalg.norm(w)
  d1 = f @ wh
  p = f - d1 * wh
  return wh + theta * p / np.sqrt(p @ p + 1e-12)


@pytest.mark.torchjd
def test_pbi_matches_torchjd_gradient():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import PBI

  rng = np.random.default_rng(0)
  for t, theta in [(2, 5.0), (3, 0.5), (4, 0.0)]:
    g, l = rand_grads(rng, t), rng.uniform(0.2, 2.0, t)
    pref, z = rng.dirichlet(np.ones(t)), rng.uniform(0, 0.1, t)
    values = torch.tensor(l, requires_grad=True)
    scal = PBI(theta, weights=torch.tensor(pref), reference=torch.tensor(z))
    (w_t,) = torch.autograd.grad(scal(values), values)
    np.testing.assert_allclose(w_t.numpy(), pbi_np(l, pref, theta, z), rtol=1e-10)
    (u,), _ = update_of(m.pbi(pref, theta, reference=z), [g], [l])
    np.testing.assert_allclose(u, w_t.numpy() @ g, rtol=1e-9)


def test_pbi_preference_per_update_and_errors():
  l = jnp.array([1.0, 2.0, 0.5])
  tx = gj.inject_hyperparams(m.pbi)(theta=2.0)
  state = tx.init(None)
  pref = np.array([0.2, 0.3, 0.5])
  w, _ = gj.task_weights(tx, None, state, task_losses=l, preference=jnp.asarray(pref))
  np.testing.assert_allclose(w, pbi_np(np.asarray(l), pref, 2.0, 0.0), rtol=1e-5)
  w, _ = gj.task_weights(m.pbi(theta=2.0), None, None, task_losses=l)  # default: uniform
  np.testing.assert_allclose(w, pbi_np(np.asarray(l), np.ones(3) / 3, 2.0, 0.0), rtol=1e-5)
  with pytest.raises(ValueError, match="preference"):
    gj.task_weights(m.pbi(), None, None, task_losses=l, preference=jnp.ones(2))
  with pytest.raises(ValueError, match="theta"):
    m.pbi(pref, -1.0)
