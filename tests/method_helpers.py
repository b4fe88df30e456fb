"""Shared helpers of the per-method test files.

Stacked gradients are built from flat ``(T, d)`` NumPy matrices (the
references of the tests work on those, with loops over tasks), run through a
method transform under ``jax.jit`` and flattened back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------- float64 (d = 10) helpers


def stacked10(flat, dtype=jnp.float64):
  """(T, 10) -> pytree with leaves (T, 2, 3) and (T, 4)."""
  flat = np.asarray(flat)
  t = flat.shape[0]
  return {
    "a": jnp.asarray(flat[:, :6].reshape(t, 2, 3), dtype),
    "b": jnp.asarray(flat[:, 6:], dtype),
  }


def flat10(tree):
  return np.concatenate(
    [np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"], np.float64).ravel()]
  )


def rand_grads(rng, t, d=10, spread=1.0):
  """(T, d) gradients with norms spread over ``10**(+-spread)``."""
  return rng.standard_normal((t, d)) * 10.0 ** rng.uniform(-spread, spread, (t, 1))


def update_of(tx, flats, losses=None, dtype=jnp.float64):
  """Runs ``tx`` over a list of (T, 10) gradients; returns flat updates, state
  (in float64 with x64 enabled for ``dtype=float64``)."""
  with jax.enable_x64(dtype == jnp.float64):
    state = tx.init({"a": jnp.zeros((2, 3), dtype), "b": jnp.zeros(4, dtype)})
    outs = []
    for i, f in enumerate(flats):
      kw = {} if losses is None else {"task_losses": jnp.asarray(losses[i], dtype)}
      u, state = jax.jit(tx.update)(stacked10(f, dtype), state, **kw)
      outs.append(flat10(u))
    state = jax.tree_util.tree_map(np.asarray, state)
  return outs, state


# ------------------------------------------------- float32 (any d) helpers


def stacked(j, dtype=jnp.float32):
  """(T, d) -> pytree with two leaves (d split 1/3, 2/3)."""
  j = np.asarray(j)
  k = max(1, j.shape[1] // 3)
  return {"a": jnp.asarray(j[:, :k], dtype), "b": jnp.asarray(j[:, k:], dtype)}


def flat(tree):
  return np.concatenate(
    [np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"], np.float64).ravel()]
  )


def apply(tx, j, **kw):
  """One jitted float32 update of ``tx`` on the (T, d) matrix ``j``, flat."""
  g = stacked(j)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), g)
  upd, _ = jax.jit(tx.update)(g, tx.init(params), **kw)
  return flat(upd)


def random_jacobian(rng, t, d, correlated=False):
  j = rng.standard_normal((t, d)) * np.exp(rng.standard_normal((t, 1)))
  if correlated:
    j = j + rng.standard_normal((1, d))
  return j


def cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------- torchjd


def identity_randperm(monkeypatch, torch):
  """Makes ``torch.randperm`` return the identity (fixed task orders)."""
  real = torch.randperm

  def fake(n, *args, **kwargs):
    return torch.arange(n)

  monkeypatch.setattr(torch, "randperm", fake)
  return real


def torch_agg(agg, j):
  import pytest

  torch = pytest.importorskip("torch")
  return agg(torch.as_tensor(j, dtype=torch.float64)).numpy()
