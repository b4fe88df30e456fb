r"""DB-MTL: dual-balancing multi-task learning.

Lin et al., "Dual-Balancing for Multi-Task Learning", 2023
(arXiv:2308.12029).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["dbmtl", "dbmtl_step", "DBMTLState"]


class DBMTLState(NamedTuple):
  """State of :func:`dbmtl`.

  Attributes:
    count: number of updates so far (int32 scalar).
    norm_ema: ``(T,)`` moving average of the log-loss gradient norms
      ``||g_i|| / (l_i + eps)``, starting from zero.
  """

  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count
  norm_ema: jax.Array


def dbmtl_step(
  gram: jax.Array,
  task_losses: jax.Array,
  norm_ema: jax.Array,
  count: jax.Array,
  *,
  beta,
  beta_sigma,
  eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
  r"""One DB-MTL step in Gram space.

  Args:
    gram: ``(T, T)`` Gram matrix of the raw task gradients ``g_i``.
    task_losses: ``(T,)`` positive losses ``l_i``.
    norm_ema: ``(T,)`` previous moving average of the log-gradient norms.
    count: the 1-based index ``t`` of this step.
    beta, beta_sigma: the step-``t`` decay is ``beta / t**beta_sigma``.
    eps: added to the losses inside the log.

  Returns:
    ``(weights, new_norm_ema)`` with
    ``weights_i = max_j n_j / n_i / (l_i + eps)``, where ``n`` is the new
    moving average (a task whose averaged norm is zero gets factor 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> # norms (2, 1), losses (1, 4): log-gradient norms (2, 1/4); the first
    >>> # step's decay 0.9 keeps 0.1 of them; factors (1, 8) over the losses
    >>> w, ema = dbmtl_step(jnp.diag(jnp.array([4., 1.])), jnp.array([1., 4.]),
    ...                     jnp.zeros(2), 1, beta=0.9, beta_sigma=0.5)
    >>> [round(float(x), 4) for x in w], [round(float(x), 4) for x in ema]
    ([1.0, 2.0], [0.2, 0.025])

  References:
    Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_, 2023
  """
  dtype = gram.dtype
  inv_l = 1.0 / (task_losses.astype(dtype) + eps)
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0)) * inv_l
  decay = jnp.asarray(beta, dtype) / jnp.asarray(count, dtype) ** jnp.asarray(beta_sigma, dtype)
  ema = decay * norm_ema.astype(dtype) + (1.0 - decay) * norms
  top = jnp.max(ema)
  pos = ema > 0
  alpha = jnp.where(pos, top / jnp.where(pos, ema, 1.0), 1.0)
  return alpha * inv_l, ema


def dbmtl(
  beta: float = 0.9, beta_sigma: float = 0.5, *, num_tasks: int, eps: float = 1e-8
) -> Method:
  r"""DB-MTL (Lin et al., 2023, arXiv:2308.12029) with averaged norms.

  1. *Loss-scale balancing*: every task is trained on
     :math:`\log(l_i + \epsilon)`, whose gradient is
     :math:`\tilde g_i = g_i / (l_i + \epsilon)` (needs ``task_losses``).
  2. *Gradient-magnitude balancing*: each log-loss gradient is rescaled to
     the largest (averaged) norm, :math:`\alpha_i = \max_j n_j / n_i`, and
     the update is :math:`\sum_i \alpha_i \tilde g_i`.

  The averaged norms use the paper's / LibMTL's decay schedule: at step
  :math:`t = 1, 2, \dots`, :math:`\beta_t = \beta / t^{\beta_\sigma}` and
  :math:`n_i \leftarrow \beta_t n_i + (1 - \beta_t)\|\tilde g_i\|` from
  :math:`n_i = 0` (``beta_sigma`` makes the average forget faster early
  on; ``beta_sigma = 0`` is a plain EMA with rate ``beta``).

  **Difference from the paper.** The paper (and LibMTL's ``DB_MTL``) keeps
  the moving average of the full log-loss gradients,
  :math:`\hat g_i \leftarrow \beta_t \hat g_i + (1-\beta_t)\tilde g_i`, and
  returns :math:`\sum_i \frac{\max_j\|\hat g_j\|}{\|\hat g_i\|}\hat g_i`:
  ``T x params`` of state and an update built from past gradients. Here the
  state is ``O(T)``: only the norms are averaged (the average of the norms,
  not the norm of the averaged gradient, which is smaller when gradients
  fluctuate), and the factors are applied to the *current* log-loss
  gradients. The two coincide at the first step and whenever the gradients
  are constant over time.

  Args:
    beta: decay in ``[0, 1)`` (LibMTL default 0.9). Injectable.
    beta_sigma: decay exponent ``>= 0`` (LibMTL default 0.5). Injectable.
    num_tasks: the task count ``T`` (the state holds ``T`` norms).
    eps: added to the losses inside the log (LibMTL: 1e-8).

  Returns:
    An optax transformation; ``update(grads, state, params, task_losses=l)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = dbmtl(num_tasks=2)
    >>> g = {"w": jnp.array([[2., 0.], [0., 1.]])}
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> upd, state = tx.update(g, state, task_losses=jnp.array([1., 4.]))
    >>> [round(float(x), 4) for x in upd["w"]]  # both log-gradients -> norm 2
    [2.0, 2.0]

  References:
    Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_, 2023
  """
  check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True, method="dbmtl")
  check_hyperparameter("beta_sigma", beta_sigma, low=0.0, method="dbmtl")
  check_hyperparameter("eps", eps, low=0.0, method="dbmtl")
  check_num_tasks(num_tasks, "dbmtl", required=True)

  def init_fn(params):
    return DBMTLState(
      count=jnp.zeros((), jnp.int32), norm_ema=jnp.zeros((num_tasks,), accumulation_dtype(params))
    )

  def weights_fn(gram, state, losses, **extra_args):
    del extra_args
    count = state.count + 1
    w, ema = dbmtl_step(
      gram, losses, state.norm_ema, count, beta=beta, beta_sigma=beta_sigma, eps=eps
    )
    return w, DBMTLState(count=count, norm_ema=ema.astype(state.norm_ema.dtype))

  return from_weighting(
    Weighting(init_fn, weights_fn, name="dbmtl", needs_losses=True, num_tasks=num_tasks)
  )
