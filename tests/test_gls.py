"""GLS (Chennupati et al., CVPRW 2019) against the paper's formula (a NumPy
loop) and the gradient of torchjd's GeometricMean scalarizer."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def gls_np(losses):
  t = len(losses)
  prod = 1.0
  for l in losses:
    prod *= l
  return np.array([prod ** (1.0 / t) / (t * l) for l in losses])


def test_gls_matches_paper_formula():
  rng = np.random.default_rng(0)
  for t in (1, 2, 3, 6):
    flats = [rand_grads(rng, t) for _ in range(3)]
    losses = [rng.uniform(0.05, 5.0, t) for _ in range(3)]
    outs, _ = update_of(m.gls(num_tasks=t), flats, losses)
    for f, l, u in zip(flats, losses, outs):
      np.testing.assert_allclose(u, gls_np(l) @ f, rtol=1e-10)


def test_gls_scale_invariant_in_losses_and_finite_at_zero():
  l = jnp.array([0.5, 2.0, 3.0])
  np.testing.assert_allclose(m.gls_weights(1e8 * l), m.gls_weights(l), rtol=1e-5)
  np.testing.assert_allclose(m.gls_weights(1e-8 * l), m.gls_weights(l), rtol=1e-5)
  w = m.gls_weights(jnp.array([0.0, 1.0, 2.0]))
  assert bool(jnp.all(jnp.isfinite(w))) and float(w[0]) > 1e10


@pytest.mark.torchjd
def test_gls_is_torchjd_geometric_mean_gradient():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import GeometricMean

  rng = np.random.default_rng(1)
  for t in (2, 4):
    g = rand_grads(rng, t)
    l = rng.uniform(0.1, 3.0, t)
    values = torch.tensor(l, requires_grad=True)
    (w_torch,) = torch.autograd.grad(GeometricMean()(values), values)
    (u,), _ = update_of(m.gls(), [g], [l])
    np.testing.assert_allclose(m.gls_weights(jnp.asarray(l)), w_torch.numpy(), rtol=1e-5)
    np.testing.assert_allclose(u, torch.tensor(g).T @ w_torch, rtol=1e-10)


def test_gls_injectable_and_task_weights():
  tx = gj.inject_hyperparams(m.gls)(num_tasks=2)
  l = jnp.array([1.0, 4.0])
  w, _ = gj.task_weights(tx, None, tx.init(None), task_losses=l)
  np.testing.assert_allclose(w, [1.0, 0.25], rtol=1e-6)
