"""Shared code of the test files of the Gram, elementwise, cross-batch and
full-state methods: (T, d) NumPy Jacobians <-> stacked pytrees, one
jitted update, torchjd in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def stacked(j, dtype=jnp.float32):
  """(T, d) -> {"a": (T, 2, k), "b": (T, d - 2k)} (two leaves, one 3-d)."""
  j = np.asarray(j)
  t, d = j.shape
  k = max(1, d // 4)
  return {
    "a": jnp.asarray(j[:, : 2 * k].reshape(t, 2, k), dtype),
    "b": jnp.asarray(j[:, 2 * k :], dtype),
  }


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in (tree["a"], tree["b"])])


def params_of(j, dtype=jnp.float32):
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], dtype), stacked(j, dtype))


def run(tx, js, dtype=jnp.float32, extras=None):
  """Jitted updates of ``tx`` over a list of (T, d) matrices; returns the
  flat updates and the states after each step. ``extras[i]``: extra
  arguments of step ``i``; a NumPy ``stacked_2`` is made a stacked tree."""
  with jax.enable_x64(dtype == jnp.float64):
    state = tx.init(params_of(js[0], dtype))
    update = jax.jit(tx.update)
    outs, states = [], []
    for i, j in enumerate(js):
      kw = {} if extras is None else dict(extras[i])
      if isinstance(kw.get("stacked_2"), np.ndarray):
        kw["stacked_2"] = stacked(kw["stacked_2"], dtype)
      u, state = update(stacked(j, dtype), state, **kw)
      outs.append(flat(u))
      states.append(jax.tree_util.tree_map(np.asarray, state))
  return outs, states


def torch64(x):
  torch = pytest.importorskip("torch")
  return torch.tensor(np.array(x, np.float64), dtype=torch.float64)


def rand_j(rng, t, d, spread=1.0, correlated=False):
  j = rng.standard_normal((t, d)) * 10.0 ** rng.uniform(-spread, spread, (t, 1))
  if correlated:
    j = j + rng.standard_normal((1, d)) * np.abs(j).mean()
  return j
