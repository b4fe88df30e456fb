r"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["famo", "famo_weights", "famo_logit_gradient", "FAMOState"]

# The official code's, LibMTL's and torchjd's epsilon added to l - b.
_EPS = 1e-8


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    count: int32 number of updates so far, saturating at 1.
    logits: ``(T,)`` task-weighting logits :math:`\\xi` (start at 0).
    prev_losses: ``(T,)`` losses of the previous update (its "before"
      losses).
    logit_opt_state: the state of the Adam optimizer of the logits.
  """

  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count
  logits: jax.Array
  prev_losses: jax.Array
  logit_opt_state: Any


def _shifted(losses, min_losses):
  return jnp.maximum(losses - min_losses, 0.0) + jnp.asarray(_EPS, losses.dtype)


def famo_weights(task_losses: jax.Array, logits: jax.Array, min_losses=0.0) -> jax.Array:
  r"""FAMO weights on the task gradients (summing to 1).

  With :math:`z = \mathrm{softmax}(\xi)` and :math:`D_i = l_i - b_i +
  \epsilon`, the update is the gradient of :math:`c \sum_i z_i \log D_i` with
  :math:`c = (\sum_i z_i / D_i)^{-1}` held constant:

  .. math:: w_i = \frac{c\, z_i}{D_i}, \qquad \sum_i w_i = 1.

  Losses below ``min_losses`` are treated as equal to it (``D = epsilon``).

  Args:
    task_losses: ``(T,)`` losses :math:`l`.
    logits: ``(T,)`` logits :math:`\xi`.
    min_losses: lower bounds :math:`b` (scalar or ``(T,)``).

  Returns:
    ``(T,)`` positive weights summing to 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> # logits 0 (z = 1/2 each): weights proportional to 1 / l = (1, 1/3)
    >>> w = famo_weights(jnp.array([1., 3.]), jnp.zeros(2))
    >>> [round(float(x), 4) for x in w]
    [0.75, 0.25]

  References:
    Liu et al., `FAMO: Fast Adaptive Multitask Optimization
    <https://openreview.net/forum?id=zMeemcUeXL>`_, NeurIPS 2023
  """
  z = jax.nn.softmax(logits.astype(task_losses.dtype))
  r = z / _shifted(task_losses, jnp.asarray(min_losses, task_losses.dtype))
  return r / jnp.sum(r)


def famo_logit_gradient(
  logits: jax.Array, before: jax.Array, after: jax.Array, min_losses=0.0
) -> jax.Array:
  r"""The gradient FAMO follows on its logits (Algorithm 1 of the paper).

  :math:`\delta_i = \log D_i^{\text{before}} - \log D_i^{\text{after}}` (the
  log-loss decrease of the step) pulled back through the softmax:
  :math:`J_{\mathrm{softmax}}(\xi)^\top \delta = z \odot (\delta - z^\top
  \delta)`. A descent step on it raises the weight of tasks whose loss
  decreased less than the weighted average.

  Args:
    logits: ``(T,)`` logits :math:`\xi`.
    before: ``(T,)`` losses before the step.
    after: ``(T,)`` losses after the step.
    min_losses: lower bounds :math:`b` (scalar or ``(T,)``).

  Returns:
    ``(T,)`` gradient on the logits.

  Examples:
    >>> import jax.numpy as jnp
    >>> # task 0's loss halved, task 1's stayed: delta = (log 2, 0), z = (1/2, 1/2),
    >>> # gradient z * (delta - z . delta) = (log 2, -log 2) / 4
    >>> g = famo_logit_gradient(jnp.zeros(2), jnp.array([1., 1.]), jnp.array([0.5, 1.]))
    >>> [round(float(x), 4) for x in g]
    [0.1733, -0.1733]

  References:
    Liu et al., `FAMO: Fast Adaptive Multitask Optimization
    <https://openreview.net/forum?id=zMeemcUeXL>`_, NeurIPS 2023
  """
  b = jnp.asarray(min_losses, before.dtype)
  delta = jnp.log(_shifted(before, b)) - jnp.log(_shifted(after, b))
  z = jax.nn.softmax(logits.astype(before.dtype))
  return z * (delta - jnp.sum(z * delta))


def famo(
  lr: float = 0.025,
  weight_decay: float = 1e-3,
  *,
  num_tasks: int,
  min_losses: Any = None,
) -> Method:
  r"""FAMO: balances the tasks' log-loss decrease rates from the losses alone.

  Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization",
  NeurIPS 2023 (arXiv:2306.03792). The update is :math:`\sum_i w_i g_i` with
  the weights of :func:`famo_weights` (a convex combination:
  :math:`w_i \propto z_i / (l_i - b_i)`, :math:`z = \mathrm{softmax}(\xi)`).
  The logits :math:`\xi` learn from how much each loss fell across a step:
  :math:`\delta = \log(l^{\text{before}} - b) - \log(l^{\text{after}} - b)`,
  and one Adam step (learning rate ``lr``, L2 weight decay
  ``weight_decay``, as in the official code, LibMTL and torchjd) on
  :math:`J_{\mathrm{softmax}}^\top \delta` (:func:`famo_logit_gradient`).

  **The losses after the step.** The paper recomputes the losses on the
  *same* batch after the parameter step. An optax update sees only the
  current losses, so the state keeps the previous update's losses, and at
  each update (before the weights are formed):

  * by default, this update's ``task_losses`` (the *next* batch, at the new
    parameters) serve as the "after" losses of the previous step. No extra
    forward pass, but :math:`\delta` then mixes the step's progress with the
    difference between two batches (noisier than the paper's), measures the
    decrease on a fresh batch instead of the batch the step was taken on
    (not the paper's quantity, even in expectation). The logit step of
    update ``t - 1`` is taken at update ``t``, before its weights are formed:
    the same point of the sequence as in the paper (nothing uses the logits
    in between), so the weights are not delayed, only measured differently;
  * pass ``losses_after_step=`` (the ``(T,)`` losses of the *previous*
    update's batch, recomputed at the current parameters; one extra forward
    pass) for the paper's exact rule: the logit update uses the same batch
    before and after the step, and the weights of this update use the logits
    updated from the previous step, exactly as in Algorithm 2.

  The first update has no previous step and only records its losses.

  Cost: reads only the losses (no Gram pass; one backward pass on the lean
  path). A non-finite ``losses_after_step`` skips the logit step. State:
  ``T`` logits, ``T`` previous losses and Adam's two ``T`` moments. Losses
  must stay above ``min_losses`` (the paper assumes :math:`l_i > b_i`);
  smaller values are clamped. Order-free.

  Args:
    lr: Adam learning rate of the logits (the paper's :math:`\beta`, 0.025;
      injectable).
    weight_decay: L2 weight decay of the logits (the paper's
      :math:`\gamma`, 1e-3; injectable).
    num_tasks: the task count ``T``.
    min_losses: lower bounds :math:`b` of the losses (scalar or ``(T,)``;
      default 0).

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=`` and
    accepts ``losses_after_step=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = famo(num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> upd, state = tx.update({"w": jnp.eye(2)}, state, task_losses=jnp.array([1., 3.]))
    >>> upd["w"]  # logits 0: weights proportional to 1 / l
    Array([0.75, 0.25], dtype=float32)

  References:
    Liu et al., `FAMO: Fast Adaptive Multitask Optimization
    <https://openreview.net/forum?id=zMeemcUeXL>`_, NeurIPS 2023
  """
  check_hyperparameter("lr", lr, low=0.0, method="famo")
  check_hyperparameter("weight_decay", weight_decay, low=0.0, method="famo")
  check_num_tasks(num_tasks, "famo", required=True)
  if min_losses is not None:
    shape = jnp.shape(min_losses)
    if shape not in ((), (num_tasks,)) and not isinstance(num_tasks, jax.core.Tracer):
      raise ValueError(f"famo: min_losses must be a scalar or ({num_tasks},), got shape {shape}")

  def logit_optimizer():
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))

  def init_fn(params):
    dtype = accumulation_dtype(params)
    logits = jnp.zeros((num_tasks,), dtype)
    return FAMOState(
      count=jnp.zeros((), jnp.int32),
      logits=logits,
      prev_losses=jnp.zeros((num_tasks,), dtype),
      logit_opt_state=logit_optimizer().init(logits),
    )

  def weights_fn(gram, state, losses, *, losses_after_step=None, **extra_args):
    del gram, extra_args
    dtype = state.logits.dtype
    b = jnp.asarray(0.0 if min_losses is None else min_losses, dtype)
    after = losses if losses_after_step is None else jnp.asarray(losses_after_step)
    after = after.astype(dtype)
    grad = famo_logit_gradient(state.logits, state.prev_losses, after, b)
    step, opt_state = logit_optimizer().update(grad, state.logit_opt_state, state.logits)
    # a non-finite "after" loss skips the logit step (the state stays finite)
    started = (state.count >= 1) & jnp.all(jnp.isfinite(after))
    logits = jnp.where(started, optax.apply_updates(state.logits, step), state.logits)
    opt_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(started, new, old).astype(jnp.result_type(old)),
      opt_state,
      state.logit_opt_state,
    )
    w = famo_weights(losses, logits, b.astype(losses.dtype))
    new_state = FAMOState(
      count=jnp.minimum(state.count + 1, 1).astype(jnp.int32),
      logits=logits.astype(dtype),
      prev_losses=losses.astype(dtype),
      logit_opt_state=opt_state,
    )
    return w, new_state

  return from_weighting(
    Weighting(
      init_fn, weights_fn, name="famo", needs_gram=False, needs_losses=True, num_tasks=num_tasks
    )
  )
