r"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = [
  "uncertainty_weighting",
  "uncertainty_weights",
  "uncertainty_log_var_step",
  "UncertaintyWeightingState",
]


class UncertaintyWeightingState(NamedTuple):
  """State of :func:`uncertainty_weighting`.

  Attributes:
    log_vars: ``(T,)`` learnable log-variances ``s_i`` (start at 0).
  """

  log_vars: jax.Array


def uncertainty_weights(log_vars: jax.Array) -> jax.Array:
  r"""Task weights :math:`w_i = e^{-s_i}` for log-variances ``s``.

  Args:
    log_vars: ``(T,)`` log-variances ``s``.

  Returns:
    ``(T,)`` positive weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> [round(float(x), 4) for x in uncertainty_weights(jnp.log(jnp.array([1., 2.])))]
    [1.0, 0.5]

  References:
    Kendall et al., `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018
  """
  return jnp.exp(-log_vars)


def uncertainty_log_var_step(log_vars: jax.Array, task_losses: jax.Array, lr) -> jax.Array:
  r"""One SGD step on ``s`` for :math:`\sum_i e^{-s_i} l_i + s_i`.

  :math:`s_i \leftarrow s_i - \mathrm{lr}\,(1 - e^{-s_i} l_i)`.
  """
  return log_vars - lr * (1.0 - jnp.exp(-log_vars) * task_losses)


def uncertainty_weighting(lr: float = 1e-2, *, num_tasks: int) -> Method:
  r"""Uncertainty weighting with learnable homoscedastic log-variances.

  Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
  Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

  The weighted loss is

  .. math:: \mathcal L(\theta, s) = \sum_i e^{-s_i} l_i(\theta) + s_i,

  with :math:`s_i = \log \sigma_i^2`. This is the paper's classification
  form with the regulariser doubled, and twice its regression form
  :math:`\sum_i \tfrac12 e^{-s_i} l_i + \tfrac12 s_i` (LibMTL's): all forms
  have the same minimiser :math:`s_i^\star = \log l_i`; with this one the
  update on :math:`\theta` is exactly :math:`\sum_i e^{-s_i} g_i` (weights
  1 at the start, i.e. the *sum* of the task gradients; the regression form
  is half of that).

  Each update:

  1. returns :math:`\sum_i e^{-s_i} g_i` using the *current* ``s`` (the
     value that defines this step's loss, as when ``s`` and ``theta`` are
     trained jointly by autodiff on the same loss);
  2. takes one plain gradient step on ``s`` with this step's losses:
     :math:`s_i \leftarrow s_i - \mathrm{lr}\,(1 - e^{-s_i} l_i)` (SGD on
     ``s``, whatever optimizer is chained after this transform for
     ``theta``).

  Args:
    lr: learning rate ``>= 0`` of the SGD step on ``s`` (injectable).
    num_tasks: the task count ``T`` (the state holds ``T`` log-variances).

  Returns:
    An optax transformation whose ``update(grads, state, params,
    task_losses=l)`` needs the ``(T,)`` task losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = uncertainty_weighting(lr=0.1, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> upd, state = tx.update(g, state, task_losses=jnp.array([2., 0.5]))
    >>> upd["w"]
    Array([1., 1.], dtype=float32)
    >>> state.log_vars
    Array([ 0.1 , -0.05], dtype=float32)

  References:
    Kendall et al., `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018
  """
  check_hyperparameter("lr", lr, low=0.0, method="uncertainty_weighting")
  check_num_tasks(num_tasks, "uncertainty_weighting", required=True)

  def init_fn(params):
    return UncertaintyWeightingState(log_vars=jnp.zeros((num_tasks,), accumulation_dtype(params)))

  def weights_fn(gram, state, losses, **extra_args):
    del gram, extra_args
    s = state.log_vars.astype(losses.dtype)
    w = uncertainty_weights(s)
    new_s = uncertainty_log_var_step(s, losses, lr)
    return w, UncertaintyWeightingState(log_vars=new_s.astype(state.log_vars.dtype))

  return from_weighting(
    Weighting(
      init_fn,
      weights_fn,
      name="uncertainty_weighting",
      needs_losses=True,
      needs_gram=False,
      num_tasks=num_tasks,
    )
  )
