r"""Random loss weighting (RLW; Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["rlw", "rlw_weights", "RLWState"]


class RLWState(NamedTuple):
  """State of :func:`rlw`.

  Attributes:
    key: ``uint32[2]`` PRNG key, split at every update to draw the weights.
  """

  key: jax.Array


def rlw_weights(key: jax.Array, num_tasks: int, *, dtype=jnp.float32) -> jax.Array:
  r"""RLW weights :math:`w = \mathrm{softmax}(z)`, :math:`z \sim \mathcal N(0, I_T)`.

  Args:
    key: PRNG key of the draw.
    num_tasks: the task count ``T`` (static).
    dtype: the weights' dtype.

  Returns:
    ``(T,)`` positive weights summing to 1.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> w = rlw_weights(jax.random.PRNGKey(0), 3)
    >>> w.shape, bool(jnp.isclose(w.sum(), 1.0)), bool((w > 0).all())
    ((3,), True, True)

  References:
    Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://openreview.net/forum?id=jjtFD8A1Wx>`_, TMLR 2022
  """
  return jax.nn.softmax(jax.random.normal(key, (num_tasks,), dtype))


def rlw(seed: int = 0, *, num_tasks: int | None = None) -> Method:
  r"""Random loss weighting: fresh random weights at every update.

  Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A
  Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv:2111.10603),
  Algorithm 2 with the standard normal distribution (LibMTL's default
  ``dist='Normal'``, and torchjd's ``Random``):

  .. math:: z \sim \mathcal N(0, I_T), \qquad w = \mathrm{softmax}(z),
     \qquad d = \sum_i w_i g_i,

  the gradient of :math:`\sum_i w_i l_i`. The weights sum to 1 (a random
  convex combination); their expectation is :math:`1/T` for every task, so
  on average the update is :func:`~gradcraft_jax.mean`'s.

  Randomness: the state holds a PRNG key (from ``seed``), split at every
  update; the draw does not depend on the gradients or losses. Cost: reads
  neither the Gram matrix nor the losses, so no Gram pass; on the lean path
  (:func:`~gradcraft_jax.combined_value_and_grad`) one backward pass. Not
  order-free for a given key (a permutation of the tasks permutes the draw's
  meaning), but equivariant in distribution.

  Args:
    seed: integer seed of the draws.
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = rlw(seed=0)
    >>> upd, state = tx.update({"w": jnp.eye(3)}, tx.init(None))
    >>> round(float(upd["w"].sum()), 5), bool((upd["w"] > 0).all())
    (1.0, True)

  References:
    Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://openreview.net/forum?id=jjtFD8A1Wx>`_, TMLR 2022
  """
  check_num_tasks(num_tasks, "rlw")
  if not isinstance(seed, (int, jax.Array)) or isinstance(seed, bool):
    raise ValueError(f"rlw: seed must be an int, got {seed!r}")

  def init_fn(params):
    del params
    return RLWState(key=jax.random.PRNGKey(seed))

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, losses, extra_args
    key, sub = jax.random.split(state.key)
    return rlw_weights(sub, num_tasks), RLWState(key=key)

  return from_weighting(
    Weighting(init_fn, weights_fn, name="rlw", needs_gram=False, num_tasks=num_tasks)
  )
