r"""Two independent mini-batches: the cross Gram matrix and its plumbing.

MoDo and SDMGrad (and anything else that needs an unbiased estimate of
:math:`J J^\top`) read :math:`K_{12} = J_1 J_2^\top`, the products of the
per-task gradients of two independent mini-batches. Such a method is a
:class:`~gradcraft_jax.Weighting` that reads the keyword ``cross_gram``
from its extra arguments; every method's ``update`` (and
:func:`~gradcraft_jax.task_weights`) also accepts the second batch's stacked
gradients as ``stacked_2=`` and forms :math:`K_{12}` from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax._guards import keep_state_unless
from gradcraft_jax._stacked import cross_gram

__all__ = ["cross_gram", "read_cross_gram", "guard_finite", "project_simplex"]


def read_cross_gram(extra_args: dict, t: int, name: str) -> jax.Array:
  """The ``(T, T)`` ``cross_gram`` extra argument, checked, in at least
  float32."""
  k12 = extra_args.get("cross_gram")
  if k12 is None:
    raise ValueError(
      f"{name} needs the gradients of a second, independent mini-batch: call "
      f"update(stacked, state, params, stacked_2=second_batch_stacked) or pass "
      f"cross_gram=gradcraft_jax.cross_gram(batch_1, batch_2), a ({t}, {t}) array"
    )
  k12 = jnp.asarray(k12)
  if k12.shape != (t, t):
    raise ValueError(f"{name}: cross_gram has shape {k12.shape}, expected ({t}, {t})")
  return k12.astype(jnp.promote_types(k12.dtype, jnp.float32))


def guard_finite(k12: jax.Array, weights: jax.Array, new_state, state):
  """NaN weights and the previous state when ``k12`` is not finite (the
  core checks only the Gram matrix and the losses)."""
  finite = jnp.all(jnp.isfinite(k12))
  weights = jnp.where(finite, weights, jnp.nan).astype(weights.dtype)
  return weights, keep_state_unless(finite, new_state, state)


def project_simplex(y: jax.Array) -> jax.Array:
  r"""Euclidean projection of ``y`` onto the probability simplex (sort-based,
  Held, Wolfe, Crowder 1974; Duchi et al. 2008): ``max(y - theta, 0)`` with
  the threshold ``theta`` from the sorted cumulative sums."""
  t = y.shape[0]
  u = jnp.sort(y)[::-1]
  css = jnp.cumsum(u)
  idx = jnp.arange(1, t + 1, dtype=y.dtype)
  cond = u - (css - 1.0) / idx > 0
  rho = jnp.max(jnp.where(cond, jnp.arange(t), 0))
  theta = (css[rho] - 1.0) / (rho + 1.0).astype(y.dtype)
  return jnp.maximum(y - theta, 0.0)
