"""Stacked per-task gradient pytrees: validation, Gram matrix, weighted sum.

A *stacked* gradient pytree has the structure of the parameters, and every
leaf carries a leading task axis of size ``T``: leaf ``p`` of shape ``s``
becomes a leaf of shape ``(T, *s)`` whose row ``i`` is ``d l_i / d p``.

Every Gram-based method in this package is three steps over such a tree:

1. ``K = gram_matrix(G)``: the ``T x T`` matrix ``K_ij = <g_i, g_j>`` summed
   over all leaves (one read of ``G``);
2. a *weighting* that maps ``K`` (plus losses and state for some methods) to
   one weight per task, ``w in R^T`` (``O(T^3)`` work, independent of the
   number of parameters);
3. ``weighted_sum(G, w) = sum_i w_i g_i`` (a second read of ``G``).

Nothing of size ``T x T x d`` is ever formed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["num_tasks", "gram_matrix", "weighted_sum", "accumulation_dtype"]

# Column-block size (elements per task row) of the blocked Gram contraction.
# T rows of this many float32 values stay in L2 cache for T up to ~64.
_GRAM_BLOCK = 4096


def num_tasks(stacked: Any) -> int:
  """Returns the task count ``T`` shared by every leaf of a stacked pytree.

  Args:
    stacked: a pytree whose leaves all have a leading task axis.

  Returns:
    ``T``, the size of the leading axis.

  Raises:
    ValueError: if the tree has no leaves, a leaf is a scalar, or two leaves
      disagree on ``T``; the message names the offending leaf.

  >>> import jax.numpy as jnp
  >>> num_tasks({"w": jnp.zeros((3, 4, 5)), "b": jnp.zeros((3, 5))})
  3
  """
  leaves = jax.tree_util.tree_leaves_with_path(stacked)
  if not leaves:
    raise ValueError("stacked gradients have no leaves; expected a pytree "
                     "whose leaves have a leading task axis")
  first_path, first = leaves[0]
  for path, leaf in leaves:
    if jnp.ndim(leaf) == 0:
      raise ValueError(
          f"leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every "
          "leaf of stacked per-task gradients needs a leading task axis")
  t = jnp.shape(first)[0]
  for path, leaf in leaves:
    if jnp.shape(leaf)[0] != t:
      raise ValueError(
          f"inconsistent task axis: leaf {jax.tree_util.keystr(path)} has "
          f"leading dimension {jnp.shape(leaf)[0]} but leaf "
          f"{jax.tree_util.keystr(first_path) or '<root>'} has {t}")
  return int(t)


def accumulation_dtype(stacked: Any) -> jnp.dtype:
  """The dtype Gram matrices and weights are computed in: float32 at least.

  float64 leaves (with ``jax_enable_x64``) give float64; bf16/fp16/fp32 give
  float32.
  """
  dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(stacked)]
  return jnp.result_type(jnp.float32, *dtypes)


def _leaf_gram(leaf: jax.Array, acc_dtype) -> jax.Array:
  """``(T, ...)`` leaf -> ``(T, T)`` Gram block, contracted in cache-sized
  column blocks so that XLA:CPU streams the leaf once."""
  t = leaf.shape[0]
  flat = leaf.reshape(t, -1)
  n = flat.shape[1]
  nblocks, tail = divmod(n, _GRAM_BLOCK)

  def block_gram(x):
    x = x.astype(acc_dtype)
    return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)

  out = jnp.zeros((t, t), acc_dtype)
  if nblocks > 1:
    def body(j, acc):
      x = jax.lax.dynamic_slice_in_dim(flat, j * _GRAM_BLOCK, _GRAM_BLOCK,
                                       axis=1)
      return acc + block_gram(x)
    out = jax.lax.fori_loop(0, nblocks, body, out)
  elif nblocks == 1:
    out = block_gram(flat[:, :_GRAM_BLOCK])
  if tail:
    out = out + block_gram(flat[:, nblocks * _GRAM_BLOCK:])
  return out


def gram_matrix(stacked: Any) -> jax.Array:
  r"""Gram matrix of stacked per-task gradients.

  .. math:: K_{ij} = \langle g_i, g_j \rangle = \sum_{\text{leaves}}
     \sum_p G_{i,p} G_{j,p}

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``.

  Returns:
    ``(T, T)`` symmetric positive semi-definite matrix in
    :func:`accumulation_dtype` (float32 for bf16/fp16/fp32 inputs).

  >>> import jax.numpy as jnp
  >>> g = {"a": jnp.array([[1., 0.], [1., 1.]]), "b": jnp.array([[2.], [0.]])}
  >>> gram_matrix(g)
  Array([[5., 1.],
         [1., 2.]], dtype=float32)
  """
  num_tasks(stacked)
  acc = accumulation_dtype(stacked)
  grams = [_leaf_gram(x, acc) for x in jax.tree_util.tree_leaves(stacked)]
  k = sum(grams[1:], grams[0])
  return 0.5 * (k + k.T)


def weighted_sum(stacked: Any, weights: jax.Array) -> Any:
  r"""Combines stacked per-task gradients: ``sum_i weights[i] * g_i``.

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``.
    weights: ``(T,)`` weights.

  Returns:
    A pytree like the parameters (task axis removed), each leaf in its input
    dtype; the sum is accumulated in at least float32.

  >>> import jax.numpy as jnp
  >>> weighted_sum({"a": jnp.array([[1., 2.], [3., 4.]])}, jnp.array([0.5, 1.]))
  {'a': Array([3.5, 5. ], dtype=float32)}
  """
  t = num_tasks(stacked)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(f"weights have shape {weights.shape}; expected ({t},)")

  def combine(leaf):
    acc = jnp.result_type(jnp.float32, leaf.dtype)
    out = jax.lax.dot_general(
        weights.astype(acc), leaf.astype(acc), (((0,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
    return out.astype(leaf.dtype)

  return jax.tree_util.tree_map(combine, stacked)


def is_concrete_number(x: Any) -> bool:
  """True for Python/NumPy scalars whose value is known at construction."""
  if isinstance(x, (bool, int, float, np.number)):
    return True
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return True
  return False
