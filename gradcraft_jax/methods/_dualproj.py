r"""DualProj: the mean gradient projected onto the dual cone of the gradients.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232), torchjd's ``DualProj``; the projection is Equation 11
of Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks, empty_init
from gradcraft_jax.methods._upgrad import dual_cone_weights
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["dualproj", "dualproj_weights"]


def dualproj_weights(
  gram: jax.Array, *, preference: jax.Array | None = None, num_iters: int = 20, reg_eps: float = 0.0
) -> jax.Array:
  r"""DualProj weights: :func:`dual_cone_weights` of the preference vector.

  :math:`v = \arg\min_{v \ge p} v^\top K v` (``p`` default ``1/T``): the
  projection of :math:`J^\top p` onto the dual cone
  :math:`\{x : Jx \ge 0\}` is :math:`J^\top v`.

  Args:
    gram: ``(T, T)`` Gram matrix.
    preference: ``(T,)`` preference weights, default ``1/T`` (the mean).
    num_iters: interior-point iterations (static).
    reg_eps: ridge on the trace-normalised Gram matrix (torchjd: 1e-4).

  Returns:
    ``(T,)`` weights ``v >= preference``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (-2, 0.5): min over v >= (1/2, 1/2) of
    >>> # (v_1 - 2 v_2)^2 + v_2^2 / 4 is at v = (1, 1/2); d = (0, 0.25)
    >>> w = dualproj_weights(jnp.array([[1., -2.], [-2., 4.25]]))
    >>> [round(float(x), 4) for x in w]
    [1.0, 0.5]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024

    Lopez-Paz and Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://proceedings.neurips.cc/paper/2017/file/f87522788a2be2d171666752f97ddebb-Paper.pdf>`_,
    NeurIPS 2017
  """
  t = gram.shape[0]
  dtype = gram.dtype
  p = jnp.full((t,), 1.0 / t, dtype) if preference is None else jnp.asarray(preference, dtype)
  return dual_cone_weights(gram, p, num_iters=num_iters, reg_eps=reg_eps)


def dualproj(
  *,
  preference: jax.Array | None = None,
  num_iters: int = 20,
  reg_eps: float = 0.0,
  num_tasks: int | None = None,
) -> Method:
  r"""DualProj (Quinton and Rey, 2024; torchjd's ``DualProj``).

  The update is the projection of the (preference-weighted) mean gradient
  onto the dual cone of the task gradients,

  .. math:: d = \arg\min_{y:\, Jy \ge 0} \|y - J^\top p\|, \qquad
     p = \mathbf 1 / T,

  so :math:`\langle g_j, d\rangle \ge 0` for every task (exactly for
  ``reg_eps=0``), and ``d`` is the mean when no gradient conflicts with it.
  Unlike :func:`~gradcraft_jax.upgrad` (the mean of the ``T`` projections
  of the individual gradients) this is one projection: one box-constrained
  dual QP :math:`\min_{v \ge p} v^\top K v` (:func:`dual_cone_weights`,
  fixed interior-point iterations plus an exact active-set polish), so its
  cost is ``O(num_iters * T^3)`` after the Gram matrix.

  Versus torchjd's ``DualProj`` (quadprog on ``K / tr(K) + 1e-4 I``):
  ``reg_eps=1e-4`` solves the same QP; the default ``reg_eps=0`` solves the
  paper's unregularised projection (see :func:`~gradcraft_jax.upgrad`).

  Args:
    preference: optional ``(T,)`` preference weights (default ``1/T``).
    num_iters: interior-point iterations (static Python int).
    reg_eps: ridge on the trace-normalised Gram matrix, ``>= 0``.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = dualproj()
    >>> g = {"w": jnp.array([[1., 0.], [-2., 0.5]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> [round(float(x), 4) for x in upd["w"]]  # the mean (-.5, .25), projected
    [0.0, 0.25]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024

    Lopez-Paz and Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://proceedings.neurips.cc/paper/2017/file/f87522788a2be2d171666752f97ddebb-Paper.pdf>`_,
    NeurIPS 2017
  """
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"dualproj: num_iters must be a positive int, got {num_iters!r}")
  check_hyperparameter("reg_eps", reg_eps, low=0.0, method="dualproj")
  check_num_tasks(num_tasks, "dualproj")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    w = dualproj_weights(gram, preference=preference, num_iters=num_iters, reg_eps=reg_eps)
    return w, state

  return from_weighting(Weighting(empty_init, weights_fn, name="dualproj", num_tasks=num_tasks))
