r"""COSMOS scalarization (Ruchte and Grabocka, ICDM 2021)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks, empty_init
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["cosmos", "cosmos_weights"]

# torch.nn.functional.cosine_similarity's eps on each norm.
_EPS = 1e-8


def cosmos_weights(task_losses: jax.Array, *, preference, penalty) -> jax.Array:
  r"""COSMOS weights: the gradient of :math:`r^\top l - \lambda \cos(r, l)`.

  .. math:: w = r - \lambda \Big(\frac{r}{\|r\|\,\|l\|} -
     \frac{(r^\top l)\, l}{\|r\|\,\|l\|^3}\Big)

  (norms below ``1e-8`` are raised to it, as in torch's
  ``cosine_similarity``). The weights can be negative.

  Args:
    task_losses: ``(T,)`` losses ``l``.
    preference: ``(T,)`` preference ``r``.
    penalty: cosine penalty :math:`\lambda \ge 0`.

  Returns:
    ``(T,)`` weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # r = (1, 0), l = (1, 1): cos = 1/sqrt(2), and the cosine's gradient
    >>> # (r/|r| - cos l/|l|) / |l| = (0.5, -0.5) / sqrt(2) is subtracted from r
    >>> w = cosmos_weights(jnp.array([1., 1.]), preference=jnp.array([1., 0.]), penalty=1.0)
    >>> [round(float(x), 4) for x in w]
    [0.6464, 0.3536]

  References:
    Ruchte and Grabocka, `Scalable Pareto Front Approximation for Deep Multi-Objective Learning
    <https://arxiv.org/abs/2103.13392>`_, ICDM 2021
  """
  dtype = task_losses.dtype
  r = jnp.asarray(preference, dtype)
  eps = jnp.asarray(_EPS, dtype)
  nr = jnp.maximum(jnp.sqrt(jnp.sum(r * r)), eps)
  nl_raw = jnp.sqrt(jnp.sum(task_losses * task_losses))
  nl = jnp.maximum(nl_raw, eps)
  r_hat, l_hat = r / nr, task_losses / nl
  cos = jnp.sum(r_hat * l_hat)
  # (r_hat - cos l_hat) / ||l||, written without ||l||^3 (no overflow);
  # the derivative of ||l|| vanishes where its clamp is active
  d_cos = (r_hat - jnp.where(nl_raw > eps, cos * l_hat, 0.0)) / nl
  return r - jnp.asarray(penalty, dtype) * d_cos


def cosmos(
  preference: Any = None,
  penalty: float = 1.0,
  *,
  num_tasks: int | None = None,
) -> Method:
  r"""COSMOS: a linear scalarization rewarded for alignment with a preference.

  Ruchte and Grabocka, "Scalable Pareto Front Approximation for Deep
  Multi-Objective Learning", ICDM 2021 (arXiv:2103.13392). The loss is
  :math:`r^\top l - \lambda \cos(r, l)` (see :func:`cosmos_weights`); its
  gradient, :math:`\sum_i w_i g_i`, is the update, the same as the gradient
  of torchjd's ``COSMOS`` scalarizer (``lambda_`` is ``penalty``,
  ``weights`` the preference). The full method also conditions the model on
  ``r`` (concatenated to its input) and draws ``r`` from a Dirichlet
  distribution for every batch: do both in the training step and pass the
  batch's ``r`` at each update as ``preference=`` (it overrides the
  factory's).

  Stateless; needs ``task_losses=``. Cost: reads only the losses (no Gram
  pass; one backward pass on the lean path). Weights may be negative.

  Args:
    preference: ``(T,)`` preference ``r`` (default: uniform ``1/T``;
      ``preference=`` at an update overrides it).
    penalty: cosine penalty :math:`\lambda \ge 0` (paper: 0.01 to 8;
      injectable).
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=`` and
    accepts ``preference=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = cosmos(jnp.array([0.5, 0.5]), penalty=1.0)
    >>> upd, _ = tx.update({"w": jnp.eye(2)}, tx.init(None), task_losses=jnp.array([1., 1.]))
    >>> [round(float(x), 4) for x in upd["w"]]  # l parallel to r: cos' = 0
    [0.5, 0.5]

  References:
    Ruchte and Grabocka, `Scalable Pareto Front Approximation for Deep Multi-Objective Learning
    <https://arxiv.org/abs/2103.13392>`_, ICDM 2021
  """
  check_hyperparameter("penalty", penalty, low=0.0, method="cosmos")
  check_num_tasks(num_tasks, "cosmos")
  default = preference

  def weights_fn(gram, state, losses, *, num_tasks, preference=None, **extra_args):
    del gram, extra_args
    pref = default if preference is None else preference
    if pref is None:
      pref = jnp.full((num_tasks,), 1.0 / num_tasks)
    if jnp.shape(pref) != (num_tasks,):
      raise ValueError(f"cosmos: preference has shape {jnp.shape(pref)}, expected ({num_tasks},)")
    return cosmos_weights(losses, preference=pref, penalty=penalty), state

  return from_weighting(
    Weighting(
      empty_init,
      weights_fn,
      name="cosmos",
      needs_gram=False,
      needs_losses=True,
      num_tasks=num_tasks,
    )
  )
