r"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and
Provable Stochastic Algorithms", NeurIPS 2023 (arXiv:2305.18409); the
official code (github.com/OptMN-Lab/SDMGrad) and torchjd's
``SDMGradWeighting``.
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

__all__ = ["sdmgrad", "sdmgrad_step", "SDMGradState"]


class SDMGradState(NamedTuple):
  """State of :func:`sdmgrad`.

  Attributes:
    weights: ``(T,)`` inner simplex weights ``w`` (warm start of the next
      inner solve; ``1/T`` at the start).
  """

  weights: jax.Array


def sdmgrad_step(
  cross_gram: jax.Array,
  weights: jax.Array,
  *,
  lambda_=0.3,
  lr=10.0,
  momentum=0.5,
  num_iters: int = 20,
  preference: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""SDMGrad's inner solve and combination weights.

  With :math:`A = J_1 J_2^\top / (\bar s^2 + 10^{-8})`,
  :math:`\bar s = \frac1T\sum_i \sqrt{\max((J_1 J_2^\top)_{ii}, 0)}` (the
  official code's scale normalisation), ``num_iters`` steps of projected SGD
  with heavy-ball momentum on the simplex,

  .. math:: v \leftarrow \mu v + A (w + \lambda \tilde w), \qquad
     w \leftarrow \Pi_\Delta(w - \eta v),

  (an unbiased stochastic gradient of
  :math:`\frac12\|J^\top(w + \lambda\tilde w)\|^2`, Equation 7 of the
  paper), then the update weights :math:`(w + \lambda\tilde w)/(1 +
  \lambda)`.

  Args:
    cross_gram: ``(T, T)`` :math:`J_1 J_2^\top`.
    weights: ``(T,)`` warm start ``w`` on the simplex.
    lambda_: pull towards the preference direction ``>= 0``.
    lr: inner step size ``> 0``.
    momentum: inner momentum in ``[0, 1)``.
    num_iters: inner steps (static).
    preference: ``(T,)`` preference :math:`\tilde w` (default ``1/T``).

  Returns:
    ``(update_weights, new_w)``, both ``(T,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # K_12 = diag(1, 4), lambda = 1: (w_1 + 1/2)^2 + 4 (w_2 + 1/2)^2 is
    >>> # smallest on the simplex at w = (1, 0); the update weights are
    >>> # (w + (1/2, 1/2)) / 2
    >>> upd_w, w = sdmgrad_step(jnp.diag(jnp.array([1., 4.])), jnp.array([0.5, 0.5]),
    ...                         lambda_=1.0)
    >>> [round(float(x), 4) for x in upd_w], [round(float(x), 4) for x in w]
    ([0.75, 0.25], [1.0, 0.0])

  References:
    Xiao et al., `Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms <https://openreview.net/forum?id=4Ks8RPcXd9>`_, NeurIPS 2023
  """
  t = cross_gram.shape[0]
  dtype = cross_gram.dtype
  wt = jnp.full((t,), 1.0 / t, dtype) if preference is None else jnp.asarray(preference, dtype)
  scale = jnp.mean(jnp.sqrt(jnp.clip(jnp.diagonal(cross_gram), 0.0)))
  a = cross_gram / (scale**2 + 1e-8)

  def body(_, carry):
    w, v = carry
    v = momentum * v + a @ (w + lambda_ * wt)
    return project_simplex(w - lr * v), v

  w, _ = jax.lax.fori_loop(0, num_iters, body, (weights.astype(dtype), jnp.zeros((t,), dtype)))
  return (w + lambda_ * wt) / (1.0 + lambda_), w


def sdmgrad(
  lambda_: float = 0.3,
  *,
  lr: float = 10.0,
  momentum: float = 0.5,
  num_iters: int = 20,
  preference: jax.Array | None = None,
  num_tasks: int,
) -> Method:
  r"""SDMGrad (Xiao, Ban, Ji, NeurIPS 2023, arXiv:2305.18409).

  Direction-oriented MGDA: the update :math:`d = J^\top (w + \lambda
  \tilde w)/(1 + \lambda)` stays within a neighbourhood of the preferred
  direction :math:`J^\top\tilde w` (the mean for :math:`\tilde w = 1/T`);
  ``w`` is found by ``num_iters`` steps of projected SGD with momentum on an
  objective estimated without bias from two independent mini-batches
  (see :func:`sdmgrad_step`), warm-started from the previous ``w``
  (state). ``lambda_ = 0`` is stochastic MGDA; large ``lambda_`` tends to
  the mean.

  **Second batch**: as for :func:`~gradcraft_jax.modo`,
  ``update(stacked, state, params, stacked_2=...)`` or ``cross_gram=``;
  the update combines ``stacked`` (the paper's third batch :math:`\zeta`
  if you pass one as ``updates`` with ``cross_gram`` from two others).

  Defaults as torchjd and the official experiments (``lambda_ = 0.3``,
  inner ``lr = 10``, ``momentum = 0.5``, ``num_iters = 20``; the official
  class default for ``lambda_`` is 0.6). The official code's scale
  normalisation makes the weights invariant to the gradients' scale as
  long as :math:`\bar s^2 \gg 10^{-8}`; below that the inner steps shrink
  (tiny gradients: the weights stay near their warm start).

  Cost: the cross Gram matrix plus ``O(num_iters * T^2)`` (sorting for the
  projections); state ``T`` floats. Order-free. No conflict guarantee.

  Args:
    lambda_: pull towards the preference direction, ``>= 0`` (injectable).
    lr: inner step size, ``> 0`` (injectable).
    momentum: inner momentum in ``[0, 1)`` (injectable).
    num_iters: inner steps (static Python int).
    preference: optional ``(T,)`` preference vector (default ``1/T``).
    num_tasks: the task count ``T`` (required: the state holds ``T``
      weights).

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = sdmgrad(0.0, lr=0.5, num_iters=100, num_tasks=2)
    >>> g = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> upd, state = tx.update(g, tx.init(None), stacked_2=g)
    >>> [round(float(x), 3) for x in state.weights]  # MGDA: (0.8, 0.2)
    [0.8, 0.2]

  References:
    Xiao et al., `Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms <https://openreview.net/forum?id=4Ks8RPcXd9>`_, NeurIPS 2023
  """
  check_hyperparameter("lambda_", lambda_, low=0.0, method="sdmgrad")
  check_hyperparameter("lr", lr, low=0.0, low_open=True, method="sdmgrad")
  check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_open=True, method="sdmgrad")
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"sdmgrad: num_iters must be a positive int, got {num_iters!r}")
  check_num_tasks(num_tasks, "sdmgrad", required=True)
  t0 = int(num_tasks)

  def init_fn(params):
    del params
    return SDMGradState(weights=jnp.full((t0,), 1.0 / t0, jnp.float32))

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, losses
    k12 = read_cross_gram(extra_args, num_tasks, "sdmgrad")
    upd_w, w = sdmgrad_step(
      k12,
      state.weights,
      lambda_=lambda_,
      lr=lr,
      momentum=momentum,
      num_iters=num_iters,
      preference=preference,
    )
    new_state = SDMGradState(weights=w.astype(state.weights.dtype))
    return guard_finite(k12, upd_w, new_state, state)

  return from_weighting(
    Weighting(init_fn, weights_fn, name="sdmgrad", needs_gram=False, num_tasks=t0)
  )
