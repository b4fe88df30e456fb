r"""Two independent mini-batches: the cross Gram matrix and its plumbing.

MoDo and SDMGrad (and anything else that needs an unbiased estimate of
:math:`J J^\top`) read :math:`K_{12} = J_1 J_2^\top`, the products of the
per-task gradients of two independent mini-batches. Such a method is a
:class:`~gradcraft_jax.Weighting` that reads the keyword ``cross_gram``
from its extra arguments; :func:`second_batch_transform` turns it into an
optax transform whose ``update`` also accepts the second batch's stacked
gradients as ``stacked_2=`` and forms :math:`K_{12}` from them. The core
(:mod:`gradcraft_jax.weighting`) is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import _explicit_replicated, accumulation_dtype, num_tasks
from gradcraft_jax.weighting import Weighting, WeightsQuery, from_weighting

__all__ = ["cross_gram"]


def cross_gram(stacked_1: Any, stacked_2: Any) -> jax.Array:
  r"""The cross Gram matrix :math:`(K_{12})_{ij} = \langle g^{(1)}_i,
  g^{(2)}_j\rangle` of two stacked gradient pytrees of the same structure.

  Not symmetric in general. One read of each tree; accumulated in at least
  float32 (float64 for float64 leaves).

  Args:
    stacked_1: stacked per-task gradients of the first batch (leading
      axis ``T``).
    stacked_2: those of an independent second batch (same structure and
      shapes).

  Returns:
    ``(T, T)`` matrix.

  >>> import jax.numpy as jnp
  >>> a = {"w": jnp.array([[1., 0.], [0., 1.]])}
  >>> b = {"w": jnp.array([[2., 1.], [0., 3.]])}
  >>> cross_gram(a, b)
  Array([[2., 0.],
         [1., 3.]], dtype=float32)
  """
  leaves_1, tree_1 = jax.tree_util.tree_flatten(stacked_1)
  leaves_2, tree_2 = jax.tree_util.tree_flatten(stacked_2)
  if tree_1 != tree_2:
    raise ValueError(
      "cross_gram: the second batch's stacked gradients have another tree structure "
      f"({tree_2}) than the first ({tree_1})"
    )
  t1, t2 = num_tasks(stacked_1), num_tasks(stacked_2)
  if t1 != t2:
    raise ValueError(f"cross_gram: the batches have {t1} and {t2} tasks")
  acc = accumulation_dtype((leaves_1, leaves_2))
  out = jnp.zeros((t1, t1), acc)
  for a, b in zip(leaves_1, leaves_2):
    if a.shape != b.shape:
      raise ValueError(f"cross_gram: leaf shapes differ between the batches: {a.shape}, {b.shape}")
    replicated = _explicit_replicated(a)
    if replicated is not None:
      # explicit-sharding meshes: contract the non-task axes in place and
      # ask for a replicated (T, T) result (local products + one all-reduce),
      # as gram_matrix does
      axes = tuple(range(1, a.ndim))
      out = out + jax.lax.dot_general(
        a,
        b,
        ((axes, axes), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=acc,
        out_sharding=replicated,
      )
      continue
    out = out + jax.lax.dot_general(
      a.reshape(t1, -1),
      b.reshape(t1, -1),
      (((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=acc,
    )
  return out


_cross_gram = cross_gram


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


def second_batch_transform(weighting: Weighting) -> optax.GradientTransformationExtraArgs:
  """``from_weighting(weighting)`` whose ``update`` also takes ``stacked_2=``.

  ``update(stacked, state, params=None, *, stacked_2=None, cross_gram=None,
  **extra_args)``: when ``stacked_2`` is given, ``cross_gram`` is
  :func:`cross_gram` ``(stacked, stacked_2)``; the weighting reads
  ``cross_gram`` from its extra arguments and the update is
  :math:`\\sum_i w_i g_i` over ``stacked``. For
  :func:`~gradcraft_jax.task_weights`, pass ``cross_gram=`` (or the first
  batch as ``stacked`` and ``stacked_2=``).
  """
  inner = from_weighting(weighting)

  def update_fn(updates, state, params=None, *, stacked_2=None, cross_gram=None, **extra_args):
    if stacked_2 is not None and cross_gram is None:
      if isinstance(updates, WeightsQuery):
        if updates.stacked is not None:
          cross_gram = _cross_gram(updates.stacked, stacked_2)
      elif jax.tree_util.tree_leaves(updates):
        cross_gram = _cross_gram(updates, stacked_2)
    return inner.update(updates, state, params, cross_gram=cross_gram, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def guard_finite(k12: jax.Array, weights: jax.Array, new_state, state):
  """NaN weights and the previous state when ``k12`` is not finite (the
  core checks only the Gram matrix and the losses)."""
  finite = jnp.all(jnp.isfinite(k12))
  weights = jnp.where(finite, weights, jnp.nan).astype(weights.dtype)
  new_state = jax.tree_util.tree_map(
    lambda new, old: jnp.where(finite, new, old).astype(jnp.result_type(new)), new_state, state
  )
  return weights, new_state


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
