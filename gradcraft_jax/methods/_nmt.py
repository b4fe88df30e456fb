r"""NMT: prioritised multi-task learning with Lagrangian differential multipliers.

Cheng et al., "No More Tuning: Prioritized Multi-Task Learning with Lagrangian
Differential Multiplier Methods", AAAI 2025 (arXiv:2412.12092).

Tasks are ranked by priority. Stage 1 trains the highest-priority task alone
and records the loss it reaches, :math:`l_1^*`. Stage ``k`` minimises task
``k`` subject to every higher-priority task ``i < k`` staying at or below the
target recorded in its own stage,

.. math:: \min_\theta l_k(\theta) \quad \text{s.t.} \quad
   l_i(\theta) \le l_i^*, \; i < k,

by gradient descent on :math:`\theta` and clipped gradient ascent on one
Lagrange multiplier per constraint. This module holds one stage's update
rule; :mod:`gradcraft_jax.stages` drives the stages.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcraft_jax._stacked import accumulation_dtype, is_concrete_number
from gradcraft_jax.methods._common import check_hyperparameter
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["nmt", "NMTState", "nmt_loss", "nmt_update_multipliers", "nmt_weights"]


class NMTState(NamedTuple):
  """State of :func:`nmt`.

  Attributes:
    multipliers: ``(T-1,)`` Lagrange multipliers, one per constrained
      (higher-priority) task, each in ``[0, lagrange_clip]``.
    count: int32 scalar, the number of updates applied.
  """

  multipliers: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count


def nmt_update_multipliers(
  multipliers: jax.Array, task_losses: jax.Array, targets: jax.Array, *, lagrange_lr, lagrange_clip
) -> jax.Array:
  r"""Advances the Lagrange multipliers by one clipped ascent step.

  For every constrained task ``i`` (rows ``0..T-2``):

  .. math:: \lambda_i \leftarrow \operatorname{clip}\bigl(\lambda_i +
     \eta \operatorname{clip}(l_i - l_i^*, -1, 1),\; 0,\; C\bigr)

  with :math:`\eta` = ``lagrange_lr`` and :math:`C` = ``lagrange_clip``.
  This is the single implementation of the rule, used by :func:`nmt` and
  meant to be used with :func:`nmt_loss`.

  Args:
    multipliers: ``(T-1,)`` current multipliers.
    task_losses: ``(T,)`` losses in priority order (the last row, the
      objective, is not used).
    targets: ``(T-1,)`` loss targets :math:`l_i^*` of the constrained tasks.
    lagrange_lr: ascent step :math:`\eta \ge 0`.
    lagrange_clip: upper bound :math:`C \ge 0` of the multipliers.

  Returns:
    ``(T-1,)`` new multipliers, in float32 or wider (the widest of the
    inputs' dtypes). The result is not differentiated through
    (``stop_gradient``).

  Examples:
    >>> import jax.numpy as jnp
    >>> nmt_update_multipliers(jnp.array([0.5, 0.0]), jnp.array([3., 0., 9.]),
    ...                        jnp.array([1., 1.]), lagrange_lr=0.1,
    ...                        lagrange_clip=1.0)
    Array([0.6, 0. ], dtype=float32)

  References:
    Cheng et al., `No More Tuning: Prioritized Multi-Task Learning with Lagrangian Differential
    Multiplier Methods <https://arxiv.org/abs/2412.12092>`_, AAAI 2025
  """
  multipliers = jnp.asarray(multipliers)
  task_losses = jnp.asarray(task_losses)
  targets = jnp.asarray(targets)
  k = multipliers.shape[0] if multipliers.ndim == 1 else None
  if k is None or task_losses.shape != (k + 1,) or targets.shape != (k,):
    raise ValueError(
      "nmt_update_multipliers: expected multipliers (T-1,), task_losses "
      f"(T,) and targets (T-1,), got {multipliers.shape}, "
      f"{task_losses.shape} and {targets.shape}"
    )
  dtype = jnp.result_type(jnp.float32, multipliers.dtype, task_losses.dtype)
  lam = jax.lax.stop_gradient(multipliers).astype(dtype)
  viol = jax.lax.stop_gradient(task_losses[:-1].astype(dtype) - targets.astype(dtype))
  lam = lam + jnp.asarray(lagrange_lr, dtype) * jnp.clip(viol, -1.0, 1.0)
  return jnp.clip(lam, 0.0, jnp.asarray(lagrange_clip, dtype))


def nmt_weights(multipliers: jax.Array) -> jax.Array:
  r"""Task weights of the NMT update from the multipliers.

  .. math:: w = \frac{(\lambda_1, \dots, \lambda_{T-1}, 1)}
     {1 + \sum_i \lambda_i}

  so that :math:`\sum_i w_i g_i = (g_T + \sum_i \lambda_i g_i) /
  (1 + \sum_i \lambda_i)`.

  Args:
    multipliers: ``(T-1,)`` non-negative multipliers.

  Returns:
    ``(T,)`` weights (summing to one).

  Examples:
    >>> import jax.numpy as jnp
    >>> nmt_weights(jnp.array([1., 2.]))
    Array([0.25, 0.5 , 0.25], dtype=float32)

  References:
    Cheng et al., `No More Tuning: Prioritized Multi-Task Learning with Lagrangian Differential
    Multiplier Methods <https://arxiv.org/abs/2412.12092>`_, AAAI 2025
  """
  lam = jnp.asarray(multipliers)
  lam = lam.astype(jnp.result_type(jnp.float32, lam.dtype))
  num = jnp.concatenate([lam, jnp.ones((1,), lam.dtype)])
  return num / (1.0 + jnp.sum(lam))


def nmt_loss(task_losses: jax.Array, multipliers: jax.Array, targets: jax.Array) -> jax.Array:
  r"""The NMT objective as one scalar loss (one backward pass).

  .. math:: L = \frac{l_T + \sum_i \lambda_i (l_i - l_i^*)}
     {1 + \sum_i \lambda_i}

  with the multipliers and targets held constant (``stop_gradient``), so
  :math:`\nabla_\theta L` is exactly the update of :func:`nmt` computed from
  the stacked task gradients. Advance the multipliers with
  :func:`nmt_update_multipliers` *before* taking the gradient, from the same
  losses, to reproduce :func:`nmt`'s step::

    def objective(params, lam):
      losses = loss_fn(params, batch)                  # (T,)
      lam = nmt_update_multipliers(lam, losses, targets, lagrange_lr=...,
                                   lagrange_clip=...)  # not differentiated
      return nmt_loss(losses, lam, targets), lam
    (loss, lam), grad = jax.value_and_grad(objective, has_aux=True)(params, lam)

  Args:
    task_losses: ``(T,)`` losses in priority order; the last is the
      objective.
    multipliers: ``(T-1,)`` multipliers (constants).
    targets: ``(T-1,)`` targets of the constrained tasks (constants).

  Returns:
    The scalar re-scaled Lagrangian.

  Examples:
    >>> import jax.numpy as jnp
    >>> nmt_loss(jnp.array([2., 5.]), jnp.array([1.]), jnp.array([1.]))
    Array(3., dtype=float32)

  References:
    Cheng et al., `No More Tuning: Prioritized Multi-Task Learning with Lagrangian Differential
    Multiplier Methods <https://arxiv.org/abs/2412.12092>`_, AAAI 2025
  """
  task_losses = jnp.asarray(task_losses)
  lam = jax.lax.stop_gradient(jnp.asarray(multipliers))
  targets = jax.lax.stop_gradient(jnp.asarray(targets))
  if (
    task_losses.ndim != 1
    or task_losses.shape[0] < 2
    or lam.shape != (task_losses.shape[0] - 1,)
    or targets.shape != lam.shape
  ):
    raise ValueError(
      "nmt_loss: expected task_losses (T,) with T >= 2, multipliers "
      f"(T-1,) and targets (T-1,), got {task_losses.shape}, {lam.shape} "
      f"and {targets.shape}"
    )
  dtype = task_losses.dtype
  lam = lam.astype(dtype)
  penalty = jnp.sum(lam * (task_losses[:-1] - targets.astype(dtype)))
  return (task_losses[-1] + penalty) / (1.0 + jnp.sum(lam))


def nmt(
  targets: Sequence[float] | jax.Array, *, lagrange_lr, lagrange_clip, init_multiplier=0.0
) -> Method:
  r"""NMT (Cheng et al., AAAI 2025): one prioritised stage as an optax transform.

  The stacked gradients have ``T = len(targets) + 1`` rows in priority
  order: rows ``0..T-2`` are the constrained higher-priority tasks (row
  ``i`` must keep :math:`l_i \le l_i^*` = ``targets[i]``), the last row is
  the task being optimised. Each step first advances the multipliers from
  this step's losses (:func:`nmt_update_multipliers`),

  .. math:: \lambda_i \leftarrow \operatorname{clip}\bigl(\lambda_i +
     \eta \operatorname{clip}(l_i - l_i^*, -1, 1), 0, C\bigr),

  then returns, with the new multipliers held fixed,

  .. math:: u = \frac{g_T + \sum_i \lambda_i g_i}{1 + \sum_i \lambda_i},

  the gradient of the re-scaled Lagrangian :func:`nmt_loss`. The weights
  depend on the losses and the state only: no Gram matrix is formed.
  Chain it in front of any optimizer; the equivalent one-backward-pass form
  is :func:`nmt_loss`.

  Args:
    targets: non-empty 1-D sequence of the ``T-1`` loss targets, e.g. the
      losses recorded at the end of the earlier stages. An update may
      override them for one step with the extra argument ``targets=``
      (shape ``(T-1,)``), e.g. the per-batch losses of a frozen earlier-stage
      model.
    lagrange_lr: multiplier ascent step :math:`\eta \ge 0`.
    lagrange_clip: multiplier upper bound :math:`C \ge 0`.
    init_multiplier: initial value of every multiplier, in ``[0, C]``.

  Returns:
    An optax transformation with state :class:`NMTState`:
    ``update(stacked_grads, state, params=None, *, task_losses, targets=None)``
    maps a pytree whose leaves have shape ``(T, ...)`` to one like the
    parameters (same dtypes). ``task_losses`` (shape ``(T,)``) is required.

  Raises:
    ValueError: for empty or non-1-D targets, negative ``lagrange_lr`` or
      ``lagrange_clip``, ``init_multiplier`` outside ``[0, C]``; at update
      time for a missing ``task_losses``, a task count other than ``T`` or a
      ``targets=`` override of the wrong shape.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(nmt([1.0], lagrange_lr=0.5, lagrange_clip=10.0),
    ...                  optax.sgd(1.0))
    >>> g = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> upd, state = tx.update(g, state, task_losses=jnp.array([3., 0.]))
    >>> upd["w"]  # lambda = 0.5: -(g_2 + 0.5 g_1) / 1.5
    Array([-0.33333334, -0.6666667 ], dtype=float32)

  References:
    Cheng et al., `No More Tuning: Prioritized Multi-Task Learning with Lagrangian Differential
    Multiplier Methods <https://arxiv.org/abs/2412.12092>`_, AAAI 2025
  """
  default_targets: jax.Array | np.ndarray
  if isinstance(targets, jax.Array):  # possibly traced: check shape only
    default_targets = targets
    if targets.ndim != 1 or targets.shape[0] < 1:
      raise ValueError(
        f"nmt: targets must be a non-empty 1-D sequence, got shape {jnp.shape(targets)}"
      )
  else:
    default_targets = np.asarray(targets)
    if default_targets.ndim != 1 or default_targets.shape[0] < 1:
      raise ValueError(
        "nmt: targets must be a non-empty 1-D sequence (one "
        "target per constrained task), got shape "
        f"{default_targets.shape}"
      )
    if not np.issubdtype(default_targets.dtype, np.number):
      raise ValueError(f"nmt: targets must be numbers, got dtype {default_targets.dtype}")
    if not np.all(np.isfinite(default_targets)):
      raise ValueError(f"nmt: targets must be finite, got {default_targets}")
  n_con = int(jnp.shape(default_targets)[0])
  t = n_con + 1
  check_hyperparameter("lagrange_lr", lagrange_lr, low=0.0, method="nmt")
  check_hyperparameter("lagrange_clip", lagrange_clip, low=0.0, method="nmt")
  high = float(lagrange_clip) if is_concrete_number(lagrange_clip) else None
  check_hyperparameter("init_multiplier", init_multiplier, low=0.0, high=high, method="nmt")

  def init_fn(params):
    dtype = accumulation_dtype(params)
    lam = jnp.full((n_con,), init_multiplier, dtype)
    return NMTState(multipliers=lam, count=jnp.zeros([], jnp.int32))

  def weights_fn(gram, state, losses, **extra_args):
    del gram
    override = extra_args.get("targets")
    if override is None:
      tgt = default_targets
    else:
      if jnp.shape(override) != (n_con,):
        raise ValueError(
          f"nmt: the targets= override has shape {jnp.shape(override)}, "
          f"expected ({n_con},), one per constrained task"
        )
      tgt = override
    dtype = losses.dtype
    tgt = jnp.asarray(tgt).astype(dtype)
    lam = nmt_update_multipliers(
      state.multipliers.astype(dtype),
      losses,
      tgt,
      lagrange_lr=lagrange_lr,
      lagrange_clip=lagrange_clip,
    )
    new_state = NMTState(
      multipliers=lam.astype(state.multipliers.dtype), count=optax.safe_increment(state.count)
    )
    return nmt_weights(lam), new_state

  return from_weighting(
    Weighting(init_fn, weights_fn, name="nmt", needs_losses=True, needs_gram=False, num_tasks=t)
  )
