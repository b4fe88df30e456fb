"""IMTL-G and IMTL (Liu et al., ICLR 2021): the paper's closed form with D
and U, equal projections, the loss-scale loop, and torchjd's IMTLG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import (
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m


def imtl_g_np(g):
  """The paper's closed form with D and U (rows g_1 - g_i, u_1 - u_i)."""
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = g[0] - g[1:]
  uu = u[0] - u[1:]
  alpha_rest = g[0] @ uu.T @ np.linalg.inv(d @ uu.T)
  alpha = np.concatenate([[1 - alpha_rest.sum()], alpha_rest])
  return alpha @ g, alpha


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 6))
def test_imtl_g_matches_paper_formula(seed, t):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t, d=10)
  expected, alpha = imtl_g_np(g)
  with jax.enable_x64(True):
    w = np.asarray(m.imtl_g_weights(jnp.asarray(g @ g.T)))
  np.testing.assert_allclose(w, alpha, rtol=1e-7, atol=1e-9)
  # equal projections on every unit gradient
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  proj = u @ (w @ g)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-7)


def test_imtl_g_degenerate():
  """Opposite gradients of equal norm: n is orthogonal to the range of K,
  no combination has equal projections, the weights are 0. (With unequal
  norms the pseudo-inverse gives the least-squares weights, like torchjd.)"""
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 1], [-1, -1]
  (u,), _ = update_of(m.imtl_g(), [g])
  np.testing.assert_allclose(u, 0.0, atol=1e-12)


def test_imtl_matches_loop():
  rng = np.random.default_rng(9)
  t, lr = 3, 0.2
  flats = [rand_grads(rng, t) for _ in range(3)]
  losses = [rng.uniform(0.2, 2.0, t) for _ in range(3)]
  outs, state = update_of(m.imtl(lr, num_tasks=t), flats, losses)
  s = np.zeros(t)
  for f, l, u in zip(flats, losses, outs):
    expected, _ = imtl_g_np(np.exp(s)[:, None] * f)
    np.testing.assert_allclose(u, expected, rtol=1e-7, atol=1e-9 * np.abs(f).max())
    s = s - lr * (np.exp(s) * l - 1.0)
  np.testing.assert_allclose(state.log_scales, s, rtol=1e-10)


@pytest.mark.torchjd
def test_torchjd_imtl_g():
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  rng = np.random.default_rng(11)
  for t in [2, 3, 5]:
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    (u,), _ = update_of(m.imtl_g(), [g])
    np.testing.assert_allclose(u, agg.IMTLG()(j).numpy(), rtol=1e-7, atol=1e-9 * np.abs(g).max())
