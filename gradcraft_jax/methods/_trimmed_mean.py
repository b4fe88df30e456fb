r"""Coordinate-wise trimmed mean: a robust aggregator that is not a weighting.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018; torchjd's ``TrimmedMean``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradcraft_jax._guards import all_finite, check_task_count
from gradcraft_jax._stacked import _UNROLL_MAX_TASKS
from gradcraft_jax._stacked import num_tasks as _num_tasks
from gradcraft_jax.methods._common import check_num_tasks, empty_init
from gradcraft_jax.weighting import CoordinatewiseMethod

__all__ = ["trimmed_mean", "trimmed_mean_combine"]


def trimmed_mean_combine(stacked: Any, trim_number: int) -> Any:
  r"""Coordinate-wise trimmed mean over the task axis of every leaf.

  For every coordinate, the ``trim_number`` largest and ``trim_number``
  smallest of the ``T`` task values are dropped and the rest averaged
  (a selection network of ``2 trim_number (T - 1)`` elementwise
  comparisons, fused into one pass over the leaf; a sort beyond 64 tasks).

  Args:
    stacked: stacked per-task gradients (leading axis ``T`` on every leaf,
      ``T >= 2 trim_number + 1``).
    trim_number: values dropped at each end (static).

  Returns:
    A pytree like the parameters, in the input dtypes (computed in at least
    float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> # five task values of one coordinate: 1 and 100 dropped, (2 + 3 + 4) / 3
    >>> g = {"w": jnp.array([[4.], [100.], [1.], [3.], [2.]])}
    >>> trimmed_mean_combine(g, 1)["w"].tolist()
    [3.0]

  References:
    Yin et al., `Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
    <https://proceedings.mlr.press/v80/yin18a/yin18a.pdf>`_, ICML 2018
  """
  t = _num_tasks(stacked)
  if t < 2 * trim_number + 1:
    raise ValueError(
      f"trimmed_mean: needs at least 2 * trim_number + 1 = {2 * trim_number + 1} tasks, got {t}"
    )

  def one(leaf):
    acc = jnp.result_type(jnp.float32, leaf.dtype)
    x = leaf.astype(acc)
    if t > _UNROLL_MAX_TASKS:
      s = jnp.sort(x, axis=0)
      return jnp.mean(s[trim_number : t - trim_number], axis=0).astype(leaf.dtype)
    # Elementwise selection network, one fused pass: trim_number bubble
    # passes move the largest values to the end (dropped), trim_number more
    # move the smallest of the rest to the end (dropped); the T - 2k rows
    # left are the middle values, in some order. (XLA:CPU's sort along the
    # task axis is about 100x slower.)
    rows = [x[i] for i in range(t)]
    for direction in (jnp.maximum, jnp.minimum):
      other = jnp.minimum if direction is jnp.maximum else jnp.maximum
      for _ in range(trim_number):
        for i in range(len(rows) - 1):
          a, b = rows[i], rows[i + 1]
          rows[i], rows[i + 1] = other(a, b), direction(a, b)
        rows.pop()
    total = rows[0]
    for r in rows[1:]:
      total = total + r
    return (total / len(rows)).astype(leaf.dtype)

  return jax.tree_util.tree_map(one, stacked)


def trimmed_mean(trim_number: int = 1, *, num_tasks: int | None = None) -> CoordinatewiseMethod:
  r"""Coordinate-wise trimmed mean (Yin et al., ICML 2018; torchjd's
  ``TrimmedMean``).

  For every parameter coordinate, drop the ``trim_number`` largest and
  smallest task values and average the remaining ``T - 2 trim_number``.

  **Not a weighting.** The kept tasks differ from coordinate to coordinate,
  so the update is not :math:`\sum_i w_i g_i` for any task weights ``w``
  and it is not a function of the Gram matrix: this transform does not use
  the library's Gram -> weights -> sum core. It is its own transform over
  the stacked gradients (one sort along the task axis per leaf, jit- and
  sharding-friendly, no data-dependent shapes). Consequently
  :func:`~gradcraft_jax.task_weights`, the lean one-backward-pass step and
  representation-level gradients do not apply to it (they raise
  ``TypeError``).

  Cost: a sort of ``T`` values per coordinate (``O(n T log T)`` for ``n``
  parameters) instead of the Gram pass and the weighted sum. Stateless,
  order-free, 1-homogeneous. An update whose input has a non-finite value
  is all NaN (as for every method of the library), even where a trimmed
  coordinate would have dropped it.

  Args:
    trim_number: values dropped at each end of every coordinate (static
      Python int ``>= 0``; ``0`` is the mean). Needs ``T >= 2 trim_number +
      1``.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over stacked per-task
    gradients; extra arguments (``task_losses``, ...) are accepted and
    ignored.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = trimmed_mean(1)
    >>> g = {"w": jnp.array([[1., 9.], [2., -7.], [100., 0.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> upd["w"]  # the median of each column
    Array([2., 0.], dtype=float32)

  References:
    Yin et al., `Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
    <https://proceedings.mlr.press/v80/yin18a/yin18a.pdf>`_, ICML 2018
  """
  if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
    raise ValueError(f"trimmed_mean: trim_number must be an int >= 0, got {trim_number!r}")
  check_num_tasks(num_tasks, "trimmed_mean")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    check_task_count(updates, "trimmed_mean", num_tasks)
    out = trimmed_mean_combine(updates, trim_number)
    finite = all_finite(updates)
    out = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)
    return out, state

  return CoordinatewiseMethod(empty_init, update_fn)
