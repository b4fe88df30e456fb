r"""IMTL: Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_num_tasks,
  empty_init,
  normalize_gram,
  pinv_psd,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["imtl_g", "imtl_g_weights", "imtl", "imtl_weights", "imtl_log_scale_step", "IMTLState"]

# |1^T K^+ n| below this (K normalised to unit largest diagonal) means that
# no combination with weights summing to 1 has equal projections: weights 0.
_DEGENERATE = 1e-6


class IMTLState(NamedTuple):
  """State of :func:`imtl`.

  Attributes:
    log_scales: ``(T,)`` learnable IMTL-L loss scales ``s_i`` (start at 0).
  """

  log_scales: jax.Array


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  r"""IMTL-G weights :math:`\alpha` (summing to 1) from the Gram matrix.

  The paper's closed form, with :math:`u_i = g_i / \|g_i\|`,
  :math:`D^\top = [g_1 - g_2, \dots, g_1 - g_T]`,
  :math:`U^\top = [u_1 - u_2, \dots, u_1 - u_T]`,

  .. math:: \alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}, \qquad
     \alpha_1 = 1 - \sum_{i \ge 2} \alpha_i,

  makes :math:`g = \sum_i \alpha_i g_i` have equal projections on every
  :math:`u_i`: :math:`\langle g, g_i \rangle = c \|g_i\|`, i.e.
  :math:`K \alpha = c\, n` with :math:`n_i = \|g_i\|`. Hence, when ``K`` is
  invertible, :math:`\alpha = K^{-1} n / (\mathbf 1^\top K^{-1} n)`, which is
  what is computed here, with the pseudo-inverse for singular ``K`` (the
  generalisation of Quinton and Rey, arXiv:2406.16232, as in torchjd's
  ``IMTLG``). When :math:`|\mathbf 1^\top K^+ n|` is ~0 (relative to the
  normalised Gram; e.g. two opposite gradients) the weights are 0.

  Note that :math:`c = 1 / \mathbf 1^\top K^{-1} n` can be negative for
  ``T >= 3``: the update then has the same *negative* projection on every
  task direction (IMTL-G does not guarantee a non-conflicting update).

  Args:
    gram: ``(T, T)`` Gram matrix.

  Returns:
    ``(T,)`` weights summing to 1 (or all 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> # orthogonal gradients of norms 2 and 1: K^-1 n = (1/2, 1), normalised
    >>> k = jnp.diag(jnp.array([4., 1.]))
    >>> w = imtl_g_weights(k)
    >>> [round(float(x), 4) for x in w]
    [0.3333, 0.6667]
    >>> # equal projections <g, g_i> / ||g_i|| on both task directions
    >>> [round(float(x), 4) for x in k @ w / jnp.sqrt(jnp.diagonal(k))]
    [0.6667, 0.6667]

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021

    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  k = normalize_gram(gram)
  n = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))
  v = pinv_psd(k) @ n
  total = jnp.sum(v)
  # Written so that a NaN total propagates.
  degenerate = jnp.abs(total) <= _DEGENERATE
  return jnp.where(degenerate, 0.0, v / jnp.where(degenerate, 1.0, total))


def imtl_g(*, num_tasks: int | None = None) -> Method:
  r"""IMTL-G: the combination with equal projections on all task directions.

  Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
  Multi-task Learning", ICLR 2021. The update :math:`\sum_i \alpha_i g_i`
  with :math:`\sum_i \alpha_i = 1` whose projection on every unit task
  gradient :math:`u_i` is the same (see :func:`imtl_g_weights`). Same scale
  as torchjd's ``IMTLG`` (weights summing to 1).

  Args:
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = imtl_g()
    >>> upd, _ = tx.update({"w": jnp.array([[2., 0.], [0., 1.]])}, tx.init(None))
    >>> [round(float(x), 4) for x in upd["w"]]  # (2a, 1 - a), a = 1/3
    [0.6667, 0.6667]

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021

    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  check_num_tasks(num_tasks, "imtl_g")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return imtl_g_weights(gram), state

  return from_weighting(Weighting(empty_init, weights_fn, name="imtl_g", num_tasks=num_tasks))


def imtl_weights(gram: jax.Array, log_scales: jax.Array) -> jax.Array:
  r"""IMTL (hybrid) weights on the raw gradients.

  IMTL-G applied to the scaled gradients :math:`e^{s_i} g_i` (Gram
  :math:`S K S`, :math:`S = \mathrm{diag}(e^{s})`), i.e.
  :math:`\sum_i \alpha_i e^{s_i} g_i` with :math:`\sum_i \alpha_i = 1`.

  Args:
    gram: ``(T, T)`` Gram matrix of the raw gradients.
    log_scales: ``(T,)`` IMTL-L loss scales ``s``.

  Returns:
    ``(T,)`` weights :math:`\alpha_i e^{s_i}`.

  Examples:
    >>> import jax.numpy as jnp
    >>> k = jnp.diag(jnp.array([4., 1.]))
    >>> [round(float(x), 4) for x in imtl_weights(k, jnp.zeros(2))]  # IMTL-G's
    [0.3333, 0.6667]
    >>> # s = (0, log 2): the scaled gradients have equal norms, alpha = (1/2, 1/2)
    >>> [round(float(x), 4) for x in imtl_weights(k, jnp.log(jnp.array([1., 2.])))]
    [0.5, 1.0]

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  scale = jnp.exp(log_scales.astype(gram.dtype))
  alpha = imtl_g_weights(scale[:, None] * gram * scale[None, :])
  return alpha * scale


def imtl_log_scale_step(log_scales: jax.Array, task_losses: jax.Array, lr) -> jax.Array:
  r"""One SGD step of IMTL-L on :math:`\sum_i e^{s_i} l_i - s_i`:
  :math:`s_i \leftarrow s_i - \mathrm{lr}\,(e^{s_i} l_i - 1)`."""
  return log_scales - lr * (jnp.exp(log_scales) * task_losses - 1.0)


def imtl(lr: float = 1e-2, *, num_tasks: int) -> Method:
  r"""IMTL (hybrid): IMTL-L loss scales followed by IMTL-G.

  Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.

  * IMTL-L: learnable scales :math:`s_i` (state, start at 0) and scaled
    losses :math:`e^{s_i} l_i - s_i`; the task gradients become
    :math:`e^{s_i} g_i`. ``s`` takes one plain gradient step per update on
    this step's losses: :math:`s_i \leftarrow s_i - \mathrm{lr}\,(e^{s_i}
    l_i - 1)` (SGD on ``s``, whatever optimizer follows this transform).
  * IMTL-G on the scaled gradients (:func:`imtl_g_weights`); the update is
    :math:`\sum_i \alpha_i e^{s_i} g_i`, :math:`\sum_i \alpha_i = 1`.

  The update uses the *current* ``s`` (the value that defines this step's
  scaled losses, as with joint autodiff training); the step on ``s`` takes
  effect at the next update. Here the transform sees only the shared
  parameters' gradients: the paper also applies the scaled losses to
  task-specific parameters, which is a matter of how the caller weights
  those losses (``jnp.exp(state.log_scales)``).

  Args:
    lr: learning rate ``>= 0`` of the SGD step on ``s`` (injectable).
    num_tasks: the task count ``T``.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = imtl(lr=0.1, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([[2., 0.], [0., 1.]])}
    >>> upd, state = tx.update(g, state, task_losses=jnp.array([1., 3.]))
    >>> state.log_scales
    Array([ 0. , -0.2], dtype=float32)

  References:
    Liu et al., `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  check_hyperparameter("lr", lr, low=0.0, method="imtl")
  check_num_tasks(num_tasks, "imtl", required=True)

  def init_fn(params):
    return IMTLState(log_scales=jnp.zeros((num_tasks,), accumulation_dtype(params)))

  def weights_fn(gram, state, losses, **extra_args):
    del extra_args
    s = state.log_scales.astype(gram.dtype)
    w = imtl_weights(gram, s)
    new_s = imtl_log_scale_step(s, losses, lr)
    return w, IMTLState(log_scales=new_s.astype(state.log_scales.dtype))

  return from_weighting(
    Weighting(init_fn, weights_fn, name="imtl", needs_losses=True, num_tasks=num_tasks)
  )
