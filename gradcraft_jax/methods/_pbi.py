r"""Penalty-based boundary intersection (PBI; Zhang and Li, IEEE TEC 2007)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks, empty_init
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["pbi", "pbi_weights"]

# torchjd's constant under the square root of d2 (finite gradient at d2 = 0).
_EPS = 1e-12


def pbi_weights(task_losses: jax.Array, *, preference, theta, reference=None) -> jax.Array:
  r"""PBI weights: the gradient of :math:`d_1 + \theta d_2` in the losses.

  With :math:`f = l - z^\star`, :math:`\hat w = w / \|w\|`,
  :math:`d_1 = f^\top \hat w`, :math:`p = f - d_1 \hat w` and
  :math:`d_2 = \sqrt{p^\top p + 10^{-12}}`:

  .. math:: \frac{\partial (d_1 + \theta d_2)}{\partial l} = \hat w +
     \theta\, \frac{p}{d_2}.

  The weights can be negative (the penalty pulls the losses towards the
  preference ray).

  Args:
    task_losses: ``(T,)`` losses ``l``.
    preference: ``(T,)`` preference direction ``w``.
    theta: penalty :math:`\theta \ge 0`.
    reference: optional ``(T,)`` reference point :math:`z^\star` (default
      the origin).

  Returns:
    ``(T,)`` weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # l = (1, 3) along w = (1, 1): d_1 w_hat = (2, 2), p = (-1, 1),
    >>> # d_2 = sqrt(2): weights (1, 1) / sqrt(2) + 2 (-1, 1) / sqrt(2)
    >>> w = pbi_weights(jnp.array([1., 3.]), preference=jnp.array([1., 1.]), theta=2.0)
    >>> [round(float(x), 4) for x in w]
    [-0.7071, 2.1213]

  References:
    Zhang and Li, MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition, IEEE
    Transactions on Evolutionary Computation 2007
  """
  dtype = task_losses.dtype
  w = jnp.asarray(preference, dtype)
  norm = jnp.sqrt(jnp.sum(w * w))
  w_hat = w / jnp.where(norm > 0, norm, 1.0)
  f = task_losses if reference is None else task_losses - jnp.asarray(reference, dtype)
  p = f - jnp.sum(f * w_hat) * w_hat
  d2 = jnp.sqrt(jnp.sum(p * p) + jnp.asarray(_EPS, dtype))
  return w_hat + jnp.asarray(theta, dtype) * p / d2


def pbi(
  preference: Any = None,
  theta: float = 5.0,
  *,
  num_tasks: int | None = None,
  reference: Any = None,
) -> Method:
  r"""PBI scalarization of the losses, as a loss-only weighting.

  Zhang and Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
  Decomposition", IEEE Trans. Evol. Comput. 2007. The update is the
  gradient of :math:`d_1 + \theta d_2`, the distance of the (shifted) loss
  vector along a preference direction plus ``theta`` times its distance to
  that direction (see :func:`pbi_weights`), i.e. :math:`\sum_i w_i g_i`;
  the same as the gradient of torchjd's ``PBI`` scalarizer (its ``weights``
  is the preference). For one trade-off per run give ``preference`` to the
  factory; to sweep the Pareto front, draw a preference per step (e.g.
  ``jax.random.dirichlet``) and pass it at each update as
  ``preference=`` (it overrides the factory's).

  Stateless; needs ``task_losses=``. Cost: reads only the losses (no Gram
  pass; one backward pass on the lean path). Weights may be negative; not
  order-free unless the preference is permuted alike.

  Args:
    preference: ``(T,)`` non-negative preference (default: uniform
      ``1/T``; ``preference=`` at an update overrides it).
    theta: penalty :math:`\theta \ge 0` (the paper's 5; injectable).
    num_tasks: optional task count ``T``, checked at each update.
    reference: optional reference (ideal) point :math:`z^\star` (default
      the origin).

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=`` and
    accepts ``preference=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = pbi(jnp.array([1.0, 1.0]), theta=0.0)
    >>> upd, _ = tx.update({"w": jnp.eye(2)}, tx.init(None), task_losses=jnp.array([1., 2.]))
    >>> [round(float(x), 4) for x in upd["w"]]  # theta = 0: the unit preference
    [0.7071, 0.7071]

  References:
    Zhang and Li, MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition, IEEE
    Transactions on Evolutionary Computation 2007
  """
  check_hyperparameter("theta", theta, low=0.0, method="pbi")
  check_num_tasks(num_tasks, "pbi")
  default = preference

  def weights_fn(gram, state, losses, *, num_tasks, preference=None, **extra_args):
    del gram, extra_args
    pref = default if preference is None else preference
    if pref is None:
      pref = jnp.full((num_tasks,), 1.0 / num_tasks)
    if jnp.shape(pref) != (num_tasks,):
      raise ValueError(f"pbi: preference has shape {jnp.shape(pref)}, expected ({num_tasks},)")
    return pbi_weights(losses, preference=pref, theta=theta, reference=reference), state

  return from_weighting(
    Weighting(
      empty_init, weights_fn, name="pbi", needs_gram=False, needs_losses=True, num_tasks=num_tasks
    )
  )
