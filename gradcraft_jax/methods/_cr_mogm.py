r"""CR-MOGM: an exponential moving average of any method's weights (Zhou et
al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting, weigh, weighting_of

__all__ = ["cr_mogm", "cr_mogm_weights", "CRMOGMState"]


class CRMOGMState(NamedTuple):
  """State of :func:`cr_mogm`.

  Attributes:
    inner: the wrapped method's state.
    weights: ``(T,)`` the smoothed weights :math:`\\lambda_{k-1}`.
    count: int32 number of updates, saturating at 1.
  """

  inner: Any
  weights: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count


def cr_mogm_weights(new_weights: jax.Array, previous: jax.Array, *, alpha) -> jax.Array:
  r"""The smoothed weights :math:`\lambda_k = \alpha \lambda_{k-1} + (1 -
  \alpha) \hat\lambda_k`.

  Args:
    new_weights: ``(T,)`` the wrapped method's weights :math:`\hat\lambda_k`.
    previous: ``(T,)`` the previous smoothed weights :math:`\lambda_{k-1}`.
    alpha: EMA coefficient in ``[0, 1]``.

  Returns:
    ``(T,)`` smoothed weights :math:`\lambda_k`.

  Examples:
    >>> import jax.numpy as jnp
    >>> w = cr_mogm_weights(jnp.array([0.9, 0.1]), jnp.array([0.5, 0.5]), alpha=0.5)
    >>> [round(float(x), 4) for x in w]
    [0.7, 0.3]

  References:
    Zhou et al., `On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond
    <https://openreview.net/forum?id=ScwfQ7hdwyP>`_, NeurIPS 2022
  """
  alpha = jnp.asarray(alpha, new_weights.dtype)
  return alpha * previous.astype(new_weights.dtype) + (1.0 - alpha) * new_weights


def cr_mogm(
  method: Any,
  alpha: float = 0.9,
  *,
  num_tasks: int,
  initial_weights: Any = None,
) -> Method:
  r"""CR-MOGM: smooths any method's task weights with a moving average.

  Zhou, Zhang, Jiang, Zhong, Gu, Zhu, "On the Convergence of Stochastic
  Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022. With
  :math:`\hat\lambda_k` the weights the wrapped method gives at update
  :math:`k`,

  .. math:: \lambda_k = \alpha\, \lambda_{k-1} + (1 - \alpha)\,
     \hat\lambda_k, \qquad d_k = \sum_i \lambda_{k,i}\, g_i,

  with :math:`\lambda_0` = ``initial_weights`` if given, else
  :math:`\hat\lambda_1` (the first update is the wrapped method's). Same
  convention as torchjd's ``CRMOGMWeighting`` (its ``alpha``; the paper's
  Corollary 1 lets :math:`\alpha_k` grow towards 1 as the learning rate
  decays: schedule ``alpha`` with :func:`~gradcraft_jax.inject_hyperparams`).

  It wraps any method of the library that weights the tasks (also one built
  by :func:`~gradcraft_jax.inject_hyperparams`): its weighting reads what
  the wrapped weighting reads (the Gram matrix, computed only if needed,
  the losses, extra arguments), calls it with the wrapped state, and
  returns the smoothed weights. It is itself a method built by
  :func:`~gradcraft_jax.from_weighting`, so
  :func:`~gradcraft_jax.task_weights`, :func:`~gradcraft_jax.inject_hyperparams`
  and the lean training step work on it. When the wrapped weights are not finite
  the update is NaN and the average is kept.

  Cost: the wrapped method's, plus ``O(T)``; state: the wrapped method's
  plus ``T`` weights. Needs what the wrapped method needs. Order-free and
  non-conflicting exactly when the wrapped method is (a convex combination
  of past weights does not keep MGDA's guarantee for the current
  gradients: not claimed).

  Args:
    method: a method of the library (or its :class:`~gradcraft_jax.Weighting`).
    alpha: EMA coefficient on the previous weights, in ``[0, 1]``
      (injectable). 0 returns the wrapped weights, 1 freezes them.
    num_tasks: the task count ``T``.
    initial_weights: optional ``(T,)`` :math:`\lambda_0`.

  Returns:
    A :class:`~gradcraft_jax.Method` over stacked gradients.

  Raises:
    TypeError: if ``method`` has no task weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> tx = cr_mogm(gj.mgda(), alpha=0.5, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> _, state = tx.update({"w": jnp.array([[1., 0.], [0., 1.]])}, state)
    >>> upd, state = tx.update({"w": jnp.array([[1., 0.], [0., 3.]])}, state)
    >>> [round(float(x), 4) for x in state.weights]  # (.5, .5), then MGDA's (.9, .1)
    [0.7, 0.3]

  References:
    Zhou et al., `On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond
    <https://openreview.net/forum?id=ScwfQ7hdwyP>`_, NeurIPS 2022
  """
  inner_w = weighting_of(method, "cr_mogm")
  check_hyperparameter("alpha", alpha, low=0.0, high=1.0, method="cr_mogm")
  check_num_tasks(num_tasks, "cr_mogm", required=True)
  if initial_weights is not None and jnp.shape(initial_weights) != (num_tasks,):
    raise ValueError(
      f"cr_mogm: initial_weights must have shape ({num_tasks},), got {jnp.shape(initial_weights)}"
    )
  start = 1 if initial_weights is not None else 0

  def init_fn(params):
    dtype = accumulation_dtype(params) if jax.tree_util.tree_leaves(params) else jnp.float32
    w0 = (
      jnp.zeros((num_tasks,), dtype)
      if initial_weights is None
      else jnp.asarray(initial_weights, dtype)
    )
    return CRMOGMState(inner=inner_w.init(params), weights=w0, count=jnp.asarray(start, jnp.int32))

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    w_hat, inner = weigh(
      inner_w,
      state.inner,
      num_tasks=num_tasks,
      gram_fn=lambda leaves: gram,
      task_losses=losses,
      dtype=jnp.float32 if losses is None else losses.dtype,
      extra_args=extra_args,
    )
    previous = jnp.where(state.count >= 1, state.weights.astype(w_hat.dtype), w_hat)
    lam = cr_mogm_weights(w_hat, previous, alpha=alpha)
    ok = jnp.all(jnp.isfinite(lam))
    new_state = CRMOGMState(
      inner=inner,
      weights=jnp.where(ok, lam, state.weights).astype(state.weights.dtype),
      count=jnp.where(ok, 1, state.count).astype(jnp.int32),
    )
    return jnp.where(ok, lam, jnp.nan), new_state

  return from_weighting(
    Weighting(
      init_fn,
      weights_fn,
      name="cr_mogm",
      needs_gram=inner_w.needs_gram,
      needs_losses=inner_w.needs_losses,
      num_tasks=num_tasks,
      gram_leaves=inner_w.gram_leaves,
    )
  )
