r"""Stage-wise prioritised training with NMT (Cheng et al., AAAI 2025).

:func:`train_prioritized` runs the priority stages of NMT on one model whose
loss function returns all ``T`` task losses in priority order:

* stage 0 trains task 0 alone and records its target :math:`l_0^*`;
* stage ``k`` trains task ``k`` under the constraints
  :math:`l_i \le l_i^*` for ``i < k`` (:func:`gradcraft_jax.nmt`), then
  records :math:`l_k^*`.

Each stage starts from the parameters the previous stage ended with and from
a fresh optimizer state and fresh multipliers. A stage selects its tasks by
taking rows ``0..k`` of the loss vector, so every stage uses the same model.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._nmt import nmt, nmt_loss, nmt_update_multipliers
from gradcraft_jax.per_task import per_task_value_and_grad

__all__ = ["train_prioritized", "PrioritizedResult", "StageHistory"]


class StageHistory(NamedTuple):
  """What happened in one stage.

  Attributes:
    task: the task optimised in this stage (its index = the stage index).
    losses: ``(steps, T)`` training losses of *all* tasks on each step's
      batch, measured before that step's update.
    multipliers: ``(steps, task)`` multipliers after each step (no columns
      in stage 0).
    target: the target :math:`l_k^*` recorded for this stage's task.
    params: the parameters at the end of the stage.
  """

  task: int
  losses: np.ndarray
  multipliers: np.ndarray
  target: float
  params: Any


class PrioritizedResult(NamedTuple):
  """Result of :func:`train_prioritized`.

  Attributes:
    params: parameters after the last stage.
    targets: ``(num_stages,)`` recorded targets, ``targets[k]`` for task ``k``.
    history: one :class:`StageHistory` per stage.
  """

  params: Any
  targets: np.ndarray
  history: list


def _make_step(loss_fn, k, optimizer, targets, hp, use_nmt_loss):
  """The jitted step of stage ``k``: ``(params, state, batch) ->
  (params, state, all_losses, multipliers)``."""

  if k == 0:

    def init(params):
      return optimizer.init(params)

    def step(params, state, batch):
      def objective(p):
        losses = loss_fn(p, batch)
        return losses[0], losses

      (_, losses), g = jax.value_and_grad(objective, has_aux=True)(params)
      upd, state = optimizer.update(g, state, params)
      return (optax.apply_updates(params, upd), state, losses, jnp.zeros((0,), losses.dtype))

  elif use_nmt_loss:  # one backward pass: the scalar re-scaled Lagrangian
    tgt = jnp.asarray(targets)

    def init(params):
      dtype = accumulation_dtype(params)
      lam = jnp.full((k,), hp["init_multiplier"], dtype)
      return lam, optimizer.init(params)

    def step(params, state, batch):
      lam, opt_state = state

      def objective(p, lam):
        losses = loss_fn(p, batch)
        lam = nmt_update_multipliers(
          lam,
          losses[: k + 1],
          tgt,
          lagrange_lr=hp["lagrange_lr"],
          lagrange_clip=hp["lagrange_clip"],
        ).astype(lam.dtype)
        return nmt_loss(losses[: k + 1], lam, tgt), (losses, lam)

      (_, (losses, lam)), g = jax.value_and_grad(objective, has_aux=True)(params, lam)
      upd, opt_state = optimizer.update(g, opt_state, params)
      return (optax.apply_updates(params, upd), (lam, opt_state), losses, lam)

  else:  # the transform on stacked per-task gradients (k + 1 backward rows)
    tx = optax.chain(nmt(list(targets), **hp), optimizer)
    init = tx.init

    def step(params, state, batch):
      def rows(p):
        losses = loss_fn(p, batch)
        return losses[: k + 1], losses

      (sel, losses), g = per_task_value_and_grad(rows, has_aux=True)(params)
      upd, state = tx.update(g, state, params, task_losses=sel)
      return (optax.apply_updates(params, upd), state, losses, state[0].multipliers)

  return init, jax.jit(step)


def train_prioritized(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  *,
  optimizer: optax.GradientTransformation,
  steps_per_stage: int | list[int],
  lagrange_lr: float,
  lagrange_clip: float,
  init_multiplier: float = 0.0,
  num_stages: int | None = None,
  target_window: int | None = None,
  eval_fn: Callable[[Any], Any] | None = None,
  use_nmt_loss: bool = False,
) -> PrioritizedResult:
  r"""Trains tasks stage by stage in priority order with NMT constraints.

  Stage ``k`` (``k = 0..num_stages-1``) minimises :math:`l_k` subject to
  :math:`l_i \le l_i^*` for every ``i < k``, starting from the parameters
  of stage ``k-1``; stage 0 is plain training of task 0. At the end of stage
  ``k`` its target is recorded:

  * by default, the **mean training loss of task k over the last
    target_window steps** of the stage (losses on each step's batch, measured
    before that step's update; set ``target_window`` to the number of steps
    in an epoch for the last-epoch mean);
  * if ``eval_fn`` is given, ``eval_fn(params)[k]`` at the end of the stage
    (e.g. a held-out loss).

  Every stage's step is ``jax.jit``-compiled once; the optimizer state and
  the multipliers are re-initialised at the start of each stage.

  Args:
    loss_fn: ``(params, batch) -> (T,)`` task losses in priority order
      (index 0 = highest priority). Stages select rows of this vector; the
      model is the same in every stage.
    params: initial parameters (a pytree).
    data: either a callable ``(stage, step) -> batch`` or one batch used at
      every step (full-batch training).
    optimizer: the optax optimizer applied after the NMT combination (its
      state is reset each stage).
    steps_per_stage: number of steps per stage (an int or one per stage).
    lagrange_lr, lagrange_clip, init_multiplier: see :func:`gradcraft_jax.nmt`.
    num_stages: how many stages to run (default ``T``; ``num_stages=2``
      trains tasks 0 and 1 only).
    target_window: steps averaged for the default target (default: the last
      tenth of the stage, at least one step).
    eval_fn: optional ``params -> (T,)`` losses used for the targets instead.
    use_nmt_loss: if true, stages ``k >= 1`` take one gradient of the
      scalar :func:`gradcraft_jax.methods.nmt_loss` (one backward pass) instead of
      running :func:`gradcraft_jax.nmt` on ``k + 1`` stacked task gradients;
      both give the same update.

  Returns:
    A :class:`PrioritizedResult` ``(params, targets, history)``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> loss_fn = lambda x, _: jnp.stack([(x[0] - 1.) ** 2, jnp.sum(x ** 2)])
    >>> res = train_prioritized(loss_fn, jnp.zeros(2), None,
    ...                         optimizer=optax.sgd(0.1), steps_per_stage=50,
    ...                         lagrange_lr=0.1, lagrange_clip=100.)
    >>> [h.losses.shape for h in res.history]
    [(50, 2), (50, 2)]

  References:
    Cheng et al., `No More Tuning: Prioritized Multi-Task Learning with Lagrangian Differential
    Multiplier Methods <https://arxiv.org/abs/2412.12092>`_, AAAI 2025
  """
  if num_stages is None:
    first = data(0, 0) if callable(data) else data
    num_stages = jax.eval_shape(loss_fn, params, first).shape[0]
  if not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
  steps = (
    [steps_per_stage] * num_stages if isinstance(steps_per_stage, int) else list(steps_per_stage)
  )
  if len(steps) != num_stages or min(steps) < 1:
    raise ValueError(
      f"steps_per_stage must be a positive int or one per "
      f"stage ({num_stages}), got {steps_per_stage!r}"
    )
  hp = dict(lagrange_lr=lagrange_lr, lagrange_clip=lagrange_clip, init_multiplier=init_multiplier)
  nmt([0.0], **hp)  # validates the hyperparameters (ValueError) up front
  get_batch = data if callable(data) else (lambda stage, step: data)

  targets: list[float] = []
  history: list[StageHistory] = []
  for k in range(num_stages):
    init, step = _make_step(loss_fn, k, optimizer, targets, hp, use_nmt_loss)
    state = init(params)
    step_losses, lams = [], []
    for i in range(steps[k]):
      params, state, l, lam = step(params, state, get_batch(k, i))
      step_losses.append(l)
      lams.append(lam)
    losses = np.asarray(jnp.stack(step_losses))
    if eval_fn is not None:
      target = float(np.asarray(eval_fn(params))[k])
    else:
      window = target_window or max(1, steps[k] // 10)
      target = float(np.mean(losses[-window:, k]))
    targets.append(target)
    history.append(StageHistory(k, losses, np.asarray(jnp.stack(lams)), target, params))
  return PrioritizedResult(params, np.asarray(targets), history)
