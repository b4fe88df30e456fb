r"""Geometric loss strategy (GLS; Chennupati et al., CVPRW 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_num_tasks, empty_init
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["gls", "gls_weights"]


def gls_weights(task_losses: jax.Array) -> jax.Array:
  r"""GLS weights: the gradient of the geometric mean of the losses.

  .. math:: w_i = \frac{\partial}{\partial l_i} \Big(\prod_j l_j\Big)^{1/T}
     = \frac{(\prod_j l_j)^{1/T}}{T\, l_i},

  computed in log space, :math:`w_i = \exp(\overline{\log l} - \log l_i) / T`
  (no overflow of the product). The weights are invariant to a common scale
  of the losses. Losses must be positive: values below the smallest positive
  normal number of the dtype are raised to it (so a zero loss gives a huge
  but finite weight; the geometric mean's gradient is infinite there).

  Args:
    task_losses: ``(T,)`` positive losses.

  Returns:
    ``(T,)`` positive weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # geometric mean of (1, 4) is 2: weights 2 / (2 * 1) and 2 / (2 * 4);
    >>> # doubling every loss leaves them unchanged
    >>> [round(float(x), 4) for x in gls_weights(jnp.array([1., 4.]))]
    [1.0, 0.25]
    >>> [round(float(x), 4) for x in gls_weights(jnp.array([2., 8.]))]
    [1.0, 0.25]

  References:
    Chennupati et al., `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
    Multi-Task Learning <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019
  """
  tiny = jnp.finfo(task_losses.dtype).tiny
  logs = jnp.log(jnp.maximum(task_losses, tiny))
  t = task_losses.shape[0]
  return jnp.exp(jnp.mean(logs) - logs) / t


def gls(*, num_tasks: int | None = None) -> Method:
  r"""Geometric loss strategy: descend the geometric mean of the losses.

  Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature
  Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR
  Workshops 2019 (arXiv:1904.08492). The multi-task loss is
  :math:`(\prod_i l_i)^{1/T}`; its gradient is :math:`\sum_i w_i g_i` with
  :math:`w_i = (\prod_j l_j)^{1/T} / (T\, l_i)` (see :func:`gls_weights`),
  the update returned here. Same as LibMTL's ``GLS`` and the gradient of
  torchjd's ``GeometricMean`` scalarizer.

  Stateless; needs ``task_losses=`` (positive). Cost: reads only the
  losses, so no Gram pass; on the lean path one backward pass. Order-free;
  the update is invariant to a common scale of the losses and linear in the
  gradients.

  Args:
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = gls()
    >>> upd, _ = tx.update({"w": jnp.eye(2)}, tx.init(None),
    ...                    task_losses=jnp.array([1.0, 4.0]))
    >>> upd["w"]  # geometric mean 2: weights 2 / (2 * 1), 2 / (2 * 4)
    Array([1.  , 0.25], dtype=float32)

  References:
    Chennupati et al., `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
    Multi-Task Learning <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019
  """
  check_num_tasks(num_tasks, "gls")

  def weights_fn(gram, state, losses, **extra_args):
    del gram, extra_args
    return gls_weights(losses), state

  return from_weighting(
    Weighting(
      empty_init, weights_fn, name="gls", needs_gram=False, needs_losses=True, num_tasks=num_tasks
    )
  )
