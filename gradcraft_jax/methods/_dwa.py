r"""Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["dwa", "dwa_weights", "DWAState"]


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    count: int32 number of past steps, saturating at 2.
    last_losses: ``(T,)`` losses of the previous step, ``L(t-1)``.
    prior_losses: ``(T,)`` losses of the step before, ``L(t-2)``.
  """

  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count
  last_losses: jax.Array
  prior_losses: jax.Array


def dwa_weights(
  last_losses: jax.Array, prior_losses: jax.Array, *, temperature, count=2
) -> jax.Array:
  r"""DWA weights :math:`w = T\,\mathrm{softmax}(r / \text{temperature})`.

  :math:`r_i = L_i(t-1) / L_i(t-2)` (taken as 1 where :math:`L_i(t-2) = 0`).
  All weights are 1 while ``count < 2`` (fewer than two past steps).

  Args:
    last_losses: ``(T,)`` losses ``L(t-1)``.
    prior_losses: ``(T,)`` losses ``L(t-2)``.
    temperature: softmax temperature ``> 0``.
    count: number of past steps seen.

  Returns:
    ``(T,)`` weights summing to ``T``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # ratios r = (1, 2): 2 softmax(r / 2) = 2 (e^0.5, e^1) / (e^0.5 + e^1)
    >>> w = dwa_weights(jnp.array([1., 2.]), jnp.array([1., 1.]), temperature=2.0)
    >>> [round(float(x), 4) for x in w], round(float(w.sum()), 4)
    ([0.7551, 1.2449], 2.0)
    >>> dwa_weights(jnp.array([1., 2.]), jnp.array([1., 1.]), temperature=2.0, count=1).tolist()
    [1.0, 1.0]

  References:
    Liu et al., `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_,
    CVPR 2019
  """
  t = last_losses.shape[0]
  ratio = jnp.where(
    prior_losses != 0, last_losses / jnp.where(prior_losses != 0, prior_losses, 1.0), 1.0
  )
  w = t * jax.nn.softmax(ratio / temperature)
  return jnp.where(jnp.asarray(count) >= 2, w, jnp.ones_like(w))


def dwa(temperature: float = 2.0, *, num_tasks: int) -> Method:
  r"""Dynamic Weight Average over stacked per-task gradients.

  Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention",
  CVPR 2019 (arXiv:1803.10704).

  .. math:: w_i(t) = T\,\frac{\exp(r_i(t-1)/\text{temperature})}
     {\sum_k \exp(r_k(t-1)/\text{temperature})}, \qquad
     r_i(t-1) = \frac{L_i(t-1)}{L_i(t-2)},

  and the update is :math:`\sum_i w_i(t) g_i`: the gradient of
  :math:`\sum_i w_i l_i` with weights summing to ``T`` (the paper's and
  LibMTL's convention; with equal weights it is the *sum* of the task
  gradients, ``T`` times :func:`~gradcraft_jax.mean`). The first two updates
  use :math:`w_i = 1`.

  The paper averages losses over an epoch; here :math:`L(t)` is the loss
  passed to the ``t``-th update (per-step granularity; pass epoch averages
  yourself through ``task_losses`` for the epoch variant). The losses
  passed to an update only enter the weights of the two following updates.

  Args:
    temperature: softmax temperature ``> 0`` (injectable).
    num_tasks: the task count ``T`` (the state holds two loss vectors).

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=`` of shape
    ``(T,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = dwa(num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.eye(2)}
    >>> for losses in ([1., 1.], [1., 2.], [1., 2.]):
    ...   upd, state = tx.update(g, state, task_losses=jnp.array(losses))
    >>> [round(float(x), 4) for x in upd["w"]]  # 2 * softmax([1, 2] / 2)
    [0.7551, 1.2449]

  References:
    Liu et al., `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_,
    CVPR 2019
  """
  check_hyperparameter("temperature", temperature, low=0.0, low_open=True, method="dwa")
  check_num_tasks(num_tasks, "dwa", required=True)

  def init_fn(params):
    dtype = accumulation_dtype(params)
    return DWAState(
      count=jnp.zeros((), jnp.int32),
      last_losses=jnp.zeros((num_tasks,), dtype),
      prior_losses=jnp.zeros((num_tasks,), dtype),
    )

  def weights_fn(gram, state, losses, **extra_args):
    del gram, extra_args
    w = dwa_weights(
      state.last_losses.astype(losses.dtype),
      state.prior_losses.astype(losses.dtype),
      temperature=jnp.asarray(temperature, losses.dtype),
      count=state.count,
    )
    new_state = DWAState(
      count=jnp.minimum(state.count + 1, 2).astype(jnp.int32),
      last_losses=losses.astype(state.last_losses.dtype),
      prior_losses=state.last_losses,
    )
    return w, new_state

  return from_weighting(
    Weighting(
      init_fn, weights_fn, name="dwa", needs_losses=True, needs_gram=False, num_tasks=num_tasks
    )
  )
