r"""Constant task weights (linear scalarization; torchjd's Constant and Sum)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from gradcraft_jax.methods._common import check_num_tasks, empty_init
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["constant", "constant_weights"]


def constant_weights(weights: Any, *, dtype=jnp.float32) -> jnp.ndarray:
  """The ``(T,)`` weights of :func:`constant`, as an array of ``dtype``.

  Args:
    weights: ``(T,)`` weights (any array-like).
    dtype: the result's dtype.

  Returns:
    ``weights`` as a ``(T,)`` array.

  Examples:
    >>> constant_weights([1, 2])
    Array([1., 2.], dtype=float32)

  References:
    Kurin et al., `In Defense of the Unitary Scalarization for Deep Multi-Task Learning
    <https://arxiv.org/abs/2201.04122>`_, NeurIPS 2022
  """
  return jnp.asarray(weights, dtype)


def constant(weights: Any = None, *, num_tasks: int | None = None) -> Method:
  r"""Fixed task weights: the update is :math:`\sum_i c_i g_i`.

  The linear scalarization :math:`\sum_i c_i l_i` (torchjd's ``Constant``
  aggregator and scalarizer; ``constant(jnp.ones(T))`` is torchjd's
  ``Sum``, and ``constant(jnp.full(T, 1 / T))`` is
  :func:`~gradcraft_jax.mean`). Stateless, reads neither the Gram matrix nor
  the losses (no Gram pass; one backward pass on the lean path). The
  weights are injectable.

  Args:
    weights: ``(T,)`` weights, or ``None`` for ones (the sum).
    num_tasks: optional task count ``T`` (must match ``weights``), checked
      at each update.

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = constant(jnp.array([1.0, 2.0]))
    >>> upd, _ = tx.update({"w": jnp.eye(2)}, tx.init(None))
    >>> upd["w"]
    Array([1., 2.], dtype=float32)

  References:
    Kurin et al., `In Defense of the Unitary Scalarization for Deep Multi-Task Learning
    <https://arxiv.org/abs/2201.04122>`_, NeurIPS 2022
  """
  check_num_tasks(num_tasks, "constant")
  t = num_tasks
  if weights is not None:
    shape = np.shape(weights)
    if len(shape) != 1 or shape[0] < 1:
      raise ValueError(f"constant: weights must be a non-empty 1-D vector, got shape {shape}")
    if num_tasks is not None and not hasattr(num_tasks, "aval") and int(num_tasks) != shape[0]:
      raise ValueError(f"constant: {shape[0]} weights but num_tasks={num_tasks}")
    t = int(shape[0])

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, losses, extra_args
    if weights is None:
      return jnp.ones((num_tasks,)), state
    return jnp.asarray(weights), state

  return from_weighting(
    Weighting(empty_init, weights_fn, name="constant", needs_gram=False, num_tasks=t)
  )
