r"""Equal weighting (EW): the mean of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp

from gradcraft_jax.methods._common import check_num_tasks, empty_init
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["mean", "mean_weights"]


def mean_weights(num_tasks: int, *, dtype=None) -> jnp.ndarray:
  """The ``(T,)`` weights ``1 / T`` of :func:`mean`.

  Args:
    num_tasks: the task count ``T``.
    dtype: the weights' dtype (default: JAX's default float dtype, float64
      under ``jax_enable_x64``).

  Returns:
    ``(T,)`` weights, each ``1 / T``.

  Examples:
    >>> mean_weights(4).tolist()
    [0.25, 0.25, 0.25, 0.25]

  References:
    Kurin et al., `In Defense of the Unitary Scalarization for Deep Multi-Task Learning
    <https://arxiv.org/abs/2201.04122>`_, NeurIPS 2022
  """
  return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)


def mean(*, num_tasks: int | None = None) -> Method:
  r"""Equal weighting: the update is :math:`\frac1T \sum_i g_i`.

  The baseline of every multi-task comparison (often called EW). A weighting
  that reads neither the Gram matrix nor the losses, so an update is one
  weighted sum (no Gram pass) and the lean training step is one backward
  pass. Stateless; accepts and ignores ``task_losses`` and other extra
  arguments.

  Args:
    num_tasks: optional task count ``T``; when given, updates with another
      ``T`` raise ``ValueError``.

  Returns:
    An optax transformation mapping stacked per-task gradients (leaves of
    shape ``(T, ...)``) to their mean over the task axis (same dtypes,
    accumulated in at least float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = mean()
    >>> upd, _ = tx.update({"w": jnp.array([[1., 2.], [3., 0.]])}, tx.init(None))
    >>> upd["w"]
    Array([2., 1.], dtype=float32)

  References:
    Kurin et al., `In Defense of the Unitary Scalarization for Deep Multi-Task Learning
    <https://arxiv.org/abs/2201.04122>`_, NeurIPS 2022
  """
  check_num_tasks(num_tasks, "mean")

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, losses, extra_args
    return mean_weights(num_tasks), state

  return from_weighting(
    Weighting(empty_init, weights_fn, name="mean", needs_gram=False, num_tasks=num_tasks)
  )
