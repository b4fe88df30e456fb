r"""Equal weighting (EW): the mean of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import num_tasks as _num_tasks
from gradcraft_jax._stacked import accumulation_dtype, weighted_sum
from gradcraft_jax.methods._common import check_num_tasks
from gradcraft_jax.weighting import empty_init

__all__ = ["mean", "mean_weights"]


def mean_weights(t: int, dtype=jnp.float32) -> jnp.ndarray:
  """The ``(T,)`` weights ``1 / T`` of :func:`mean`."""
  return jnp.full((t,), 1.0 / t, dtype)


def mean(*, num_tasks: int | None = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""Equal weighting: the update is :math:`\frac1T \sum_i g_i`.

  The baseline of every multi-task comparison (often called EW). The weights
  do not depend on the Gram matrix, so this transform is written directly on
  :func:`~gradcraft_jax.weighted_sum` rather than through
  :func:`~gradcraft_jax.from_weighting` (whose weighting only learns ``T``
  from the Gram matrix or the losses; computing the Gram would cost a second
  read of the gradients for nothing). It behaves like every other method:
  stateless, accepts and ignores ``task_losses`` and other extra arguments.

  Args:
    num_tasks: optional task count ``T``; when given, updates with another
      ``T`` raise ``ValueError``.

  Returns:
    An optax transformation mapping stacked per-task gradients (leaves of
    shape ``(T, ...)``) to their mean over the task axis (same dtypes,
    accumulated in at least float32).

  >>> import jax.numpy as jnp
  >>> tx = mean()
  >>> upd, _ = tx.update({"w": jnp.array([[1., 2.], [3., 0.]])}, tx.init(None))
  >>> upd["w"]
  Array([2., 1.], dtype=float32)
  """
  check_num_tasks(num_tasks, "mean")

  def update_fn(updates, state, params=None, *, task_losses=None,
                **extra_args):
    del params, task_losses, extra_args
    t = _num_tasks(updates)
    if num_tasks is not None and t != num_tasks:
      raise ValueError(
          f"mean: built for num_tasks={num_tasks} but the stacked gradients "
          f"have {t} tasks on their leading axis")
    return (weighted_sum(updates, mean_weights(t, accumulation_dtype(updates))),
            state)

  return optax.GradientTransformationExtraArgs(empty_init, update_fn)
