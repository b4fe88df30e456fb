r"""MoCo: multi-objective gradient correction with tracked gradients.

Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias
in Multi-objective Learning: A Provably Convergent Approach", ICLR 2023
(arXiv:2210.12624), Algorithm 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._guards import all_finite, check_task_count
from gradcraft_jax._stacked import gram_matrix, same_treedef, weighted_sum
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.methods._cross_batch import project_simplex
from gradcraft_jax.weighting import CoordinatewiseMethod

__all__ = ["moco", "MoCoState"]


class MoCoState(NamedTuple):
  """State of :func:`moco` (``T`` copies of the parameters' size).

  Attributes:
    tracked: stacked pytree (leaves ``(T, *param.shape)``): the tracked
      per-task gradients :math:`y_i` (zeros at the start).
    weights: ``(T,)`` task weights :math:`\\lambda` on the simplex.
  """

  tracked: Any
  weights: jax.Array


def moco(
  beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0, *, num_tasks: int
) -> CoordinatewiseMethod:
  r"""MoCo (Fernando et al., ICLR 2023, arXiv:2210.12624), Algorithm 1.

  Stochastic MGDA is biased because the min-norm weights of noisy
  gradients are not the min-norm weights of their means. MoCo tracks each
  task's gradient with a moving average and runs MGDA's weight update on
  the tracked gradients:

  .. math::
     y_i &\leftarrow y_i - \beta\,(y_i - g_i), \\
     \lambda &\leftarrow \Pi_\Delta\big(\lambda - \gamma\,(Y Y^\top +
     \rho I)\lambda\big), \\
     d &= \sum_i \lambda_i y_i .

  **Memory: the state holds** ``T`` **copies of the parameters** (the
  tracked gradients :math:`y_i`, same dtypes as the parameters), on top of
  the stacked gradients themselves. The update combines the *tracked*
  gradients, not the incoming ones, so MoCo is not a weighting of the
  stacked gradients: it is its own transform (the Gram matrix of ``Y`` is
  still formed with the library's ``gram_matrix``, the update with
  ``weighted_sum``), and :func:`~gradcraft_jax.task_weights`, the lean
  one-backward-pass step and representation-level gradients do not apply
  to it.

  Step sizes are constant here (the paper's analysis decays them; a
  ``optax.inject_hyperparams`` schedule can decay ``beta`` and ``gamma``).
  The paper's projection of :math:`y_i` onto a bounded set (for the
  analysis) is omitted, as in the official code. LibMTL's ``MoCo``
  additionally rescales each incoming gradient to
  :math:`\ell_i\, g_i/\|g_i\|` and replaces the simplex projection with a
  softmax; this follows the paper.

  Cost per update: one pass over ``Y`` and ``G`` for the moving average,
  the Gram matrix of ``Y``, ``O(T^2)`` for the weights, one weighted sum.
  Order-free; not scale-invariant (the weight step scales with
  :math:`\|y\|^2`, as in the paper). No conflict guarantee. A non-finite
  input gives a NaN update and leaves the state unchanged.

  Args:
    beta: tracking rate in ``(0, 1]`` (injectable).
    gamma: step size of the weights ``> 0`` (injectable).
    rho: ridge ``>= 0`` (injectable).
    num_tasks: the task count ``T`` (required: the state is ``T`` copies of
      the parameters).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over stacked per-task
    gradients whose ``init`` needs the parameters (for the state's shapes).

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = moco(beta=1.0, gamma=0.5, num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> upd, state = tx.update({"w": jnp.array([[1., 0.], [0., 2.]])}, state)
    >>> state.weights  # one MGDA-style step from (1/2, 1/2), as MoDo's example
    Array([0.875, 0.125], dtype=float32)

  References:
    Fernando et al., `Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
    Approach <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023
  """
  check_hyperparameter("beta", beta, low=0.0, high=1.0, low_open=True, method="moco")
  check_hyperparameter("gamma", gamma, low=0.0, low_open=True, method="moco")
  check_hyperparameter("rho", rho, low=0.0, method="moco")
  check_num_tasks(num_tasks, "moco", required=True)
  t0 = int(num_tasks)

  def init_fn(params):
    if params is None or not jax.tree_util.tree_leaves(params):
      tracked = params
    else:
      tracked = jax.tree_util.tree_map(
        lambda p: jnp.zeros((t0,) + jnp.shape(p), jnp.result_type(p)), params
      )
    return MoCoState(tracked=tracked, weights=jnp.full((t0,), 1.0 / t0, jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    check_task_count(updates, "moco", t0)
    if not same_treedef(
      jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(state.tracked)
    ):
      raise ValueError(
        "moco: the stacked gradients do not have the structure of the parameters given to init"
      )

    def track(y, g):
      acc = jnp.result_type(jnp.float32, y.dtype, g.dtype)
      y_acc = y.astype(acc)
      return (y_acc + jnp.asarray(beta, acc) * (g.astype(acc) - y_acc)).astype(y.dtype)

    tracked = jax.tree_util.tree_map(track, state.tracked, updates)
    k = gram_matrix(tracked)
    lam = state.weights.astype(k.dtype)
    lam = project_simplex(lam - gamma * (k @ lam + rho * lam))
    out = weighted_sum(tracked, lam)
    out = jax.tree_util.tree_map(lambda x, g: x.astype(g.dtype), out, _first_row(updates))
    finite = all_finite(updates) & jnp.all(jnp.isfinite(k))
    out = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)
    new_state = MoCoState(tracked=tracked, weights=lam.astype(state.weights.dtype))
    new_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old).astype(old.dtype), new_state, state
    )
    return out, new_state

  return CoordinatewiseMethod(init_fn, update_fn)


def _first_row(stacked):
  return jax.tree_util.tree_map(lambda x: x[0], stacked)
