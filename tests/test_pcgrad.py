"""PCGrad and PCGrad+ against NumPy loops over tasks written from the papers
(projections in the given random orders), hand-checked values, and torchjd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import (
  identity_randperm,
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m
from gradcraft_jax.methods._common import task_permutations


def pcgrad_np(g, perms):
  t = len(g)
  out = []
  for i in range(t):
    v = g[i].copy()
    for j in perms[i]:
      if j == i:
        continue
      inner = v @ g[j]
      if inner < 0 and g[j] @ g[j] > 0:
        v = v - inner / (g[j] @ g[j]) * g[j]
    out.append(v)
  return np.sum(out, axis=0)


def pcgrad_plus_np(g, perms, tau, eps):
  t = len(g)
  norms = np.linalg.norm(g, axis=1)
  top = norms.max()
  hat = np.array(
    [(tau * top / norms[i] + 1 - tau) * g[i] if norms[i] > 0 else g[i] for i in range(t)]
  )
  hn = np.linalg.norm(hat, axis=1)
  out = []
  for i in range(t):
    v = hat[i].copy()
    for j in perms[i]:
      if j == i:
        continue
      inner = v @ hat[j]
      if inner < 0 and hn[j] > 0:
        v = v + (eps * hn[i] * hn[j] - inner) / hn[j] ** 2 * hat[j]
    out.append(v)
  return np.mean(out, axis=0)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 7))
def test_pcgrad_weights_match_reference(seed, t):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t)
  perms = np.stack([rng.permutation(t) for _ in range(t)])
  with jax.enable_x64(True):
    w = np.asarray(m.pcgrad_weights(jnp.asarray(g @ g.T), jnp.asarray(perms)))
  np.testing.assert_allclose(w @ g, pcgrad_np(g, perms), atol=1e-10 * np.abs(g).max())


def test_pcgrad_update_uses_state_key():
  """The transform draws its orders from the key in the state, exactly as
  ``task_permutations`` does."""
  rng = np.random.default_rng(3)
  t = 5
  flats = [rand_grads(rng, t) for _ in range(3)]
  outs, state = update_of(m.pcgrad(seed=7), flats)
  key = jax.random.PRNGKey(7)
  for f, u in zip(flats, outs):
    key, perms = task_permutations(key, t)
    np.testing.assert_allclose(u, pcgrad_np(f, np.asarray(perms)), atol=1e-10 * np.abs(f).max())
  np.testing.assert_array_equal(state.key, key)


def test_pcgrad_hand_checked():
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 0], [-1, 1]
  (u,), _ = update_of(m.pcgrad(), [g])
  # g1 -> (1,0) - (-1)/2 (-1,1) = (0.5, 0.5); g2 -> (-1,1) + (1,0) = (0, 1)
  np.testing.assert_allclose(u[:2], [0.5, 1.5], atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(2, 7),
  tau=st.sampled_from([0.0, 0.3, 1.0]),
  eps=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_pcgrad_plus_weights_match_reference(seed, t, tau, eps):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t)
  perms = np.stack([rng.permutation(t) for _ in range(t)])
  with jax.enable_x64(True):
    w = np.asarray(
      m.pcgrad_plus_weights(jnp.asarray(g @ g.T), jnp.asarray(perms), tau=tau, eps=eps)
    )
  np.testing.assert_allclose(
    w @ g, pcgrad_plus_np(g, perms, tau, eps), atol=1e-9 * np.abs(g).max() * 10**1
  )


def test_pcgrad_plus_two_tasks_hits_target():
  """For T = 2 each projected gradient ends exactly at the eps target."""
  rng = np.random.default_rng(4)
  g = np.array([[1.0, 0.2, 0.0], [-0.9, 0.5, 0.3]])
  tau, eps = 0.5, 0.2
  norms = np.linalg.norm(g, axis=1)
  s = tau * norms.max() / norms + 1 - tau
  hat = s[:, None] * g
  with jax.enable_x64(True):
    w = np.asarray(
      m.pcgrad_plus_weights(jnp.asarray(g @ g.T), jnp.array([[0, 1], [1, 0]]), tau=tau, eps=eps)
    )
  # sum of projected = T * update; solve the two projected rows by hand
  hn = np.linalg.norm(hat, axis=1)
  p0 = hat[0] + (eps * hn[0] * hn[1] - hat[0] @ hat[1]) / hn[1] ** 2 * hat[1]
  p1 = hat[1] + (eps * hn[0] * hn[1] - hat[0] @ hat[1]) / hn[0] ** 2 * hat[0]
  np.testing.assert_allclose(p0 @ hat[1], eps * hn[0] * hn[1])
  np.testing.assert_allclose(w @ g, (p0 + p1) / 2, rtol=1e-12)
  del rng


def test_pcgrad_plus_reduces_to_pcgrad_over_t():
  rng = np.random.default_rng(6)
  g = rand_grads(rng, 4)
  perms = jnp.asarray(np.stack([rng.permutation(4) for _ in range(4)]))
  with jax.enable_x64(True):
    k = jnp.asarray(g @ g.T)
    np.testing.assert_allclose(
      m.pcgrad_plus_weights(k, perms, tau=0.0, eps=0.0), m.pcgrad_weights(k, perms) / 4, rtol=1e-12
    )


@pytest.mark.torchjd
@pytest.mark.parametrize("t", [2, 4])
def test_torchjd_pcgrad_fixed_order(monkeypatch, t):
  """torchjd draws its orders with torch.randperm: fix them to the identity
  and compare with identity orders here (sum convention in both)."""
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  identity_randperm(monkeypatch, torch)
  rng = np.random.default_rng(12 + t)
  perms = jnp.tile(jnp.arange(t), (t, 1))
  for _ in range(3):
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    with jax.enable_x64(True):
      k = jnp.asarray(g @ g.T)
      w = np.asarray(m.pcgrad_weights(k, perms))
      np.testing.assert_allclose(w @ g, agg.PCGrad()(j).numpy(), atol=1e-10 * np.abs(g).max())
