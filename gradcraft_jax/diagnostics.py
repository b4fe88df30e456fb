r"""Cheap diagnostics of stacked per-task gradients: norms, cosines, conflicts.

Everything here is computed from one Gram matrix
:math:`K_{ij} = \langle g_i, g_j \rangle` (:func:`gradcraft_jax.gram_matrix`,
one read of the stacked gradients), so it costs about as much as one
Gram-based method update and is cheap enough to log every ``N`` training
steps inside a jitted step:

* :func:`gradient_cosines` -- the ``(T, T)`` cosine-similarity matrix;
* :func:`conflict_counts` -- for each task, how many other tasks it conflicts
  with (negative inner product);
* :func:`gradient_stats` -- norms, cosines and conflict counts together.

All functions are jittable (fixed shapes, no host round trips). A task whose
gradient is exactly zero has cosine ``0`` with every task (itself included)
and conflicts with none; finite input never gives NaN. Non-finite input gives
non-finite norms and cosines.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import gram_matrix

__all__ = [
  "GradientStats",
  "gradient_cosines",
  "cosines_from_gram",
  "conflict_counts",
  "gradient_stats",
]


class GradientStats(NamedTuple):
  """Summary of ``T`` task gradients (see :func:`gradient_stats`).

  Attributes:
    norms: ``(T,)`` Euclidean norms :math:`\\|g_i\\|`.
    cosines: ``(T, T)`` cosine similarities (:func:`gradient_cosines`).
    num_conflicts: ``(T,)`` int32, number of tasks ``j != i`` with
      :math:`\\langle g_i, g_j \\rangle < 0`.
    total_conflicting_pairs: int32 scalar, number of unordered conflicting
      pairs ``i < j`` (``num_conflicts.sum() / 2``).
  """

  norms: jax.Array
  cosines: jax.Array
  num_conflicts: jax.Array
  total_conflicting_pairs: jax.Array


def cosines_from_gram(gram: jax.Array) -> jax.Array:
  r"""Cosine-similarity matrix from a Gram matrix.

  .. math:: C_{ij} = \frac{K_{ij}}{\sqrt{K_{ii}}\sqrt{K_{jj}}}

  computed after dividing ``K`` by its largest diagonal entry (cosines are
  scale-invariant; this keeps gradients of norm 1e-10 .. 1e10 accurate in
  float32) and clipped to ``[-1, 1]``. Rows and columns of zero-norm tasks
  are ``0`` (their diagonal entry too); all other diagonal entries are ``1``.

  Args:
    gram: ``(T, T)`` symmetric PSD Gram matrix.

  Returns:
    ``(T, T)`` symmetric matrix in the dtype of ``gram``.

  Examples:
    >>> import jax.numpy as jnp
    >>> cosines_from_gram(jnp.array([[4., -2., 0.], [-2., 4., 0.], [0., 0., 0.]]))
    Array([[ 1. , -0.5,  0. ],
           [-0.5,  1. ,  0. ],
           [ 0. ,  0. ,  0. ]], dtype=float32)
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"gram must be a square (T, T) matrix, got shape {gram.shape}")
  diag = jnp.diagonal(gram)
  top = jnp.max(diag)
  # ``top == 0`` only when every gradient is zero; NaN/inf pass through.
  k = gram / jnp.where(top == 0, 1.0, top).astype(gram.dtype)
  d = jnp.sqrt(jnp.maximum(jnp.diagonal(k), 0.0))
  zero = d == 0  # False for NaN, so NaN propagates
  safe = jnp.where(zero, 1.0, d)
  cos = k / safe[:, None] / safe[None, :]
  cos = jnp.where(zero[:, None] | zero[None, :], 0.0, cos)
  eye = jnp.eye(gram.shape[0], dtype=bool)
  # Exact ones on the diagonal of nonzero tasks (NaN stays NaN).
  cos = jnp.where(eye & ~zero[:, None], jnp.where(jnp.isnan(d), d, 1.0)[:, None], cos)
  return jnp.clip(cos, -1.0, 1.0).astype(gram.dtype)


def gradient_cosines(stacked: Any) -> jax.Array:
  r"""Cosine-similarity matrix of stacked per-task gradients.

  :math:`C_{ij} = \langle g_i, g_j \rangle / (\|g_i\| \|g_j\|)`, from one
  Gram pass (:func:`cosines_from_gram`). Zero-norm tasks give ``0`` (never
  NaN).

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``.

  Returns:
    ``(T, T)`` float32 (float64 for float64 leaves).

  Examples:
    >>> import jax.numpy as jnp
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.], [0., 0.]])}
    >>> gradient_cosines(g).round(4)
    Array([[ 1.    , -0.7071,  0.    ],
           [-0.7071,  1.    ,  0.    ],
           [ 0.    ,  0.    ,  0.    ]], dtype=float32)
  """
  return cosines_from_gram(gram_matrix(stacked))


def _conflicts_from_gram(gram: jax.Array) -> jax.Array:
  t = gram.shape[0]
  off = ~jnp.eye(t, dtype=bool)
  return jnp.sum((gram < 0) & off, axis=1).astype(jnp.int32)


def conflict_counts(x: Any, *, is_gram: bool | None = None) -> jax.Array:
  r"""Number of tasks each task conflicts with.

  .. math:: c_i = \#\{j \ne i : \langle g_i, g_j \rangle < 0\}

  Args:
    x: stacked per-task gradients (pytree of ``(T, ...)`` leaves) or their
      ``(T, T)`` Gram matrix.
    is_gram: whether ``x`` is a Gram matrix. By default a bare square 2-D
      array is taken as a Gram matrix and anything else as stacked
      gradients; pass ``is_gram=False`` for a single ``(T, T)`` gradient
      leaf.

  Returns:
    ``(T,)`` int32 counts in ``[0, T - 1]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.], [0., 1.]])}
    >>> conflict_counts(g)
    Array([1, 1, 0], dtype=int32)
    >>> conflict_counts(jnp.array([[1., -1.], [-1., 2.]]))
    Array([1, 1], dtype=int32)
  """
  if is_gram is None:
    is_gram = (
      (isinstance(x, (jax.Array,)) or hasattr(x, "__array__"))
      and jnp.ndim(x) == 2
      and jnp.shape(x)[0] == jnp.shape(x)[1]
    )
  gram = jnp.asarray(x) if is_gram else gram_matrix(x)
  if is_gram and (gram.ndim != 2 or gram.shape[0] != gram.shape[1]):
    raise ValueError(f"gram must be a square (T, T) matrix, got shape {gram.shape}")
  return _conflicts_from_gram(gram)


def gradient_stats(stacked: Any) -> GradientStats:
  r"""Norms, cosines and conflict counts of stacked gradients, one Gram pass.

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``.

  Returns:
    :class:`GradientStats` with ``norms (T,)``, ``cosines (T, T)``,
    ``num_conflicts (T,)`` int32 and ``total_conflicting_pairs ()`` int32.
    Jittable; suitable for logging inside a training step, e.g.
    ``stats = gradient_stats(grads)`` next to ``tx.update(grads, ...)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = gradient_stats({"w": jnp.array([[3., 0.], [-1., 1.], [0., 2.]])})
    >>> s.norms.round(4)
    Array([3.    , 1.4142, 2.    ], dtype=float32)
    >>> s.num_conflicts, s.total_conflicting_pairs
    (Array([1, 1, 0], dtype=int32), Array(1, dtype=int32))
  """
  gram = gram_matrix(stacked)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  counts = _conflicts_from_gram(gram)
  return GradientStats(
    norms=norms,
    cosines=cosines_from_gram(gram),
    num_conflicts=counts,
    total_conflicting_pairs=(jnp.sum(counts) // 2).astype(jnp.int32),
  )
