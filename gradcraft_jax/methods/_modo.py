r"""MoDo: multi-objective gradient descent with double sampling.

Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective
Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS
2023 (arXiv:2305.20057; JMLR 2024); torchjd's ``MoDoWeighting``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.methods._cross_batch import (
  guard_finite,
  project_simplex,
  read_cross_gram,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["modo", "modo_weights", "MoDoState"]


class MoDoState(NamedTuple):
  """State of :func:`modo`.

  Attributes:
    weights: ``(T,)`` task weights :math:`\\lambda` on the simplex (``1/T``
      at the start).
  """

  weights: jax.Array


def modo_weights(cross_gram: jax.Array, weights: jax.Array, *, gamma=0.1, rho=0.0) -> jax.Array:
  r"""One MoDo step of the task weights (Equation 2.9a of Chen et al.):

  .. math:: \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,
     (J_1 J_2^\top \lambda + \rho\lambda)\big),

  a projected stochastic gradient step on
  :math:`\frac12\|J^\top\lambda\|^2 + \frac\rho2\|\lambda\|^2` whose
  gradient :math:`J_1 J_2^\top \lambda` is unbiased because the two
  batches are independent (:math:`\Pi_\Delta`: Euclidean projection onto
  the simplex).

  Args:
    cross_gram: ``(T, T)`` :math:`K_{12} = J_1 J_2^\top`.
    weights: ``(T,)`` current :math:`\lambda`.
    gamma: step size ``> 0``.
    rho: ridge ``>= 0``.

  Returns:
    ``(T,)`` new weights on the simplex.

  Examples:
    >>> import jax.numpy as jnp
    >>> # (1/2, 1/2) - 0.5 (1/2, 2) = (1/4, -1/2), projected onto the simplex
    >>> w = modo_weights(jnp.diag(jnp.array([1., 4.])), jnp.array([0.5, 0.5]), gamma=0.5)
    >>> [round(float(x), 4) for x in w]
    [0.875, 0.125]

  References:
    Chen et al., `Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance <https://openreview.net/forum?id=yPkbdJxQ0o>`_, NeurIPS 2023
  """
  grad = cross_gram @ weights + rho * weights
  return project_simplex(weights - gamma * grad)


def modo(gamma: float = 0.1, rho: float = 0.0, *, num_tasks: int) -> Method:
  r"""MoDo (Chen et al., NeurIPS 2023, arXiv:2305.20057).

  MGDA with double sampling: the task weights :math:`\lambda` (state) take
  one projected gradient step per update on the MGDA objective
  :math:`\frac12\|J^\top \lambda\|^2`, estimated without bias from two
  independent mini-batches, :math:`J_1 J_2^\top \lambda` (see
  :func:`modo_weights`); the update is :math:`\sum_i \lambda_i g_i` over
  the stacked gradients passed as ``updates``.

  **Second batch.** ``update(stacked, state, params, stacked_2=...)``
  takes the stacked gradients of a second, independent batch (same tree)
  and forms :math:`K_{12} = \langle \text{stacked}_i,
  \text{stacked\_2}_j\rangle` (:func:`~gradcraft_jax.cross_gram`, one read
  of each tree; the Gram matrix of ``stacked`` itself is not computed).
  Alternatively pass ``cross_gram=`` directly, e.g. to combine a third
  batch's gradients (the paper's Algorithm 1 and LibMTL use three
  batches: two for :math:`\lambda`, a third for the update) or to use
  :func:`~gradcraft_jax.task_weights` with the lean step. Without either,
  ``update`` raises ``ValueError``: a single batch's Gram matrix would
  bias the estimate and break the method's guarantee.

  Cost: the cross Gram matrix (one read of each batch) plus ``O(T^2)``;
  state ``T`` floats. Order-free. Not scale-invariant: the step on
  :math:`\lambda` scales with :math:`\|g\|^2` as in the paper (no
  normalisation; tune ``gamma`` to the gradients' scale). No conflict
  guarantee per step.

  Args:
    gamma: step size of the weights (``> 0``, injectable).
    rho: ridge ``>= 0`` (injectable).
    num_tasks: the task count ``T`` (required: the state holds ``T``
      weights).

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = modo(gamma=0.5, num_tasks=2)
    >>> g1 = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> g2 = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> upd, state = tx.update(g1, tx.init(None), stacked_2=g2)
    >>> state.weights  # the task with the larger gradient loses weight
    Array([0.875, 0.125], dtype=float32)

  References:
    Chen et al., `Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance <https://openreview.net/forum?id=yPkbdJxQ0o>`_, NeurIPS 2023
  """
  check_hyperparameter("gamma", gamma, low=0.0, low_open=True, method="modo")
  check_hyperparameter("rho", rho, low=0.0, method="modo")
  check_num_tasks(num_tasks, "modo", required=True)
  t0 = int(num_tasks)

  def init_fn(params):
    del params
    return MoDoState(weights=jnp.full((t0,), 1.0 / t0, jnp.float32))

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, losses
    lam = state.weights
    k12 = read_cross_gram(extra_args, num_tasks, "modo")
    new = modo_weights(k12, lam.astype(k12.dtype), gamma=gamma, rho=rho).astype(lam.dtype)
    return guard_finite(k12, new, MoDoState(weights=new), state)

  return from_weighting(Weighting(init_fn, weights_fn, name="modo", needs_gram=False, num_tasks=t0))
