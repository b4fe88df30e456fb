r"""IMTL-L: the loss-balancing half of IMTL (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.methods._imtl import imtl_log_scale_step
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["imtl_l", "imtl_l_weights", "IMTLLState"]


class IMTLLState(NamedTuple):
  """State of :func:`imtl_l`.

  Attributes:
    log_scales: ``(T,)`` learnable loss scales ``s_i`` (start at 0).
  """

  log_scales: jax.Array


def imtl_l_weights(log_scales: jax.Array) -> jax.Array:
  r"""IMTL-L weights :math:`w_i = e^{s_i}`, the gradient of
  :math:`\sum_i e^{s_i} l_i - s_i` with respect to :math:`l_i`.

  Args:
    log_scales: ``(T,)`` loss scales ``s``.

  Returns:
    ``(T,)`` positive weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> [round(float(x), 4) for x in imtl_l_weights(jnp.log(jnp.array([1., 2.])))]
    [1.0, 2.0]

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  return jnp.exp(log_scales)


def imtl_l(lr: float = 1e-2, *, num_tasks: int) -> Method:
  r"""IMTL-L on its own: learnable loss scales, no gradient balancing.

  Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
  Multi-task Learning", ICLR 2021 (the loss-balance part, Section 3.2).
  The multi-task loss is

  .. math:: \mathcal L(\theta, s) = \sum_i e^{s_i} l_i(\theta) - s_i,

  whose minimiser in :math:`s` makes every scaled loss :math:`e^{s_i} l_i`
  equal to 1. Each update

  1. returns :math:`\sum_i e^{s_i} g_i` with the *current* ``s`` (the value
     that defines this step's loss, as when ``s`` and ``theta`` are trained
     jointly by autodiff; the sum of the gradients at the start);
  2. takes one plain gradient step on ``s`` with this step's losses,
     :math:`s_i \leftarrow s_i - \mathrm{lr}\,(e^{s_i} l_i - 1)` (SGD on ``s``,
     whatever optimizer follows this transform).

  This is torchjd's ``IMTLL`` scalarizer trained with SGD on its scales, and
  twice uncertainty weighting with ``s`` negated. :func:`imtl` combines the
  same scales with IMTL-G (gradient balancing); this transform is the
  loss-only half: no Gram pass, and one backward pass on the lean path.

  Args:
    lr: learning rate ``>= 0`` of the step on ``s`` (injectable).
    num_tasks: the task count ``T``.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = imtl_l(lr=0.1, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> upd, state = tx.update({"w": jnp.eye(2)}, state, task_losses=jnp.array([1., 3.]))
    >>> upd["w"], state.log_scales
    (Array([1., 1.], dtype=float32), Array([ 0. , -0.2], dtype=float32))

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  check_hyperparameter("lr", lr, low=0.0, method="imtl_l")
  check_num_tasks(num_tasks, "imtl_l", required=True)

  def init_fn(params):
    return IMTLLState(log_scales=jnp.zeros((num_tasks,), accumulation_dtype(params)))

  def weights_fn(gram, state, losses, **extra_args):
    del gram, extra_args
    s = state.log_scales.astype(losses.dtype)
    w = imtl_l_weights(s)
    new_s = imtl_log_scale_step(s, losses, lr)
    return w, IMTLLState(log_scales=new_s.astype(state.log_scales.dtype))

  return from_weighting(
    Weighting(
      init_fn, weights_fn, name="imtl_l", needs_gram=False, needs_losses=True, num_tasks=num_tasks
    )
  )
