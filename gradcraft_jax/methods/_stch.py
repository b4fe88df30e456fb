r"""Smooth Tchebycheff scalarization (STCH; Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["stch", "stch_weights", "STCHState"]


class STCHState(NamedTuple):
  """State of :func:`stch`.

  Attributes:
    count: int32 number of warm-up updates seen, saturating at
      ``warmup_steps``.
    loss_sum: ``(T,)`` sum of the warm-up losses.
    reference: ``(T,)`` reference point in loss units (the nadir/ideal
      point; the warm-up average once the warm-up is over).
  """

  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count
  loss_sum: jax.Array
  reference: jax.Array


def _objective(losses, log_losses):
  """``(f(l), f'(l))``; ``log_losses`` may be a traced bool (injected)."""
  if isinstance(log_losses, (bool, np.bool_)) and not log_losses:
    return losses, jnp.ones_like(losses)
  safe = jnp.maximum(losses, jnp.finfo(losses.dtype).tiny)
  use_log = jnp.asarray(log_losses, bool)
  return jnp.where(use_log, jnp.log(safe), losses), jnp.where(use_log, 1.0 / safe, 1.0)


def stch_weights(
  task_losses: jax.Array,
  *,
  mu,
  preference: jax.Array | None = None,
  reference: jax.Array | None = None,
  log_losses: bool = False,
) -> jax.Array:
  r"""STCH weights: the gradient of the smooth Tchebycheff scalarization.

  With objectives :math:`f_i = l_i` (or :math:`\log l_i` when
  ``log_losses``), reference :math:`z_i` (``reference``, or its log),
  preference :math:`\lambda` and smoothing :math:`\mu`,

  .. math:: g_\mu = \mu \log \sum_i \exp\Big(\frac{\lambda_i (f_i - z_i)}
     {\mu}\Big), \qquad
     w_i = \frac{\partial g_\mu}{\partial l_i} = \lambda_i\,
     \mathrm{softmax}\Big(\frac{\lambda (f - z)}{\mu}\Big)_i\,
     \frac{\partial f_i}{\partial l_i}.

  Args:
    task_losses: ``(T,)`` losses.
    mu: smoothing ``> 0``; smaller is closer to the weighted maximum.
    preference: ``(T,)`` non-negative :math:`\lambda` (default ``1/T``).
    reference: ``(T,)`` reference point in loss units (default 0, or 1 with
      ``log_losses``, i.e. :math:`z = 0`).
    log_losses: use :math:`f_i = \log l_i` (losses clamped to the smallest
      positive normal number).

  Returns:
    ``(T,)`` non-negative weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> l = jnp.array([1., 2.])
    >>> # lambda = 1, z = 0, mu = 1: softmax(l) = (1, e) / (1 + e)
    >>> [round(float(x), 4) for x in stch_weights(l, mu=1.0, preference=jnp.ones(2))]
    [0.2689, 0.7311]
    >>> # small mu: the gradient of the largest loss alone
    >>> [round(float(x), 4) for x in stch_weights(l, mu=0.01, preference=jnp.ones(2))]
    [0.0, 1.0]

  References:
    Lin et al., `Smooth Tchebycheff Scalarization for Multi-Objective Optimization
    <https://openreview.net/forum?id=m4dO5L6eCp>`_, ICML 2024
  """
  t = task_losses.shape[0]
  dtype = task_losses.dtype
  lam = jnp.full((t,), 1.0 / t, dtype) if preference is None else jnp.asarray(preference, dtype)
  f, df = _objective(task_losses, log_losses)
  if reference is None:
    z = jnp.zeros((t,), dtype)
  else:
    z, _ = _objective(jnp.broadcast_to(jnp.asarray(reference, dtype), (t,)), log_losses)
  # Centred before the division by mu (the paper's Appendix B.1, as torchjd),
  # so nothing overflows for large losses and small mu; the largest exponent
  # is set to exactly 0 by index, because XLA:CPU may round the two terms of
  # (y - max y) / mu differently, and at 1e12 that error alone exceeds the
  # range of exp.
  y = lam * (f - z)
  d = jnp.minimum((y - jnp.max(y)) / jnp.asarray(mu, dtype), 0.0)
  d = jnp.where(jnp.arange(t) == jnp.argmax(y), 0.0, d)
  e = jnp.exp(d)
  return lam * (e / jnp.sum(e)) * df


def stch(
  mu: float = 1.0,
  *,
  num_tasks: int,
  preference: Any = None,
  reference: Any = None,
  warmup_steps: int = 0,
  log_losses: bool = False,
) -> Method:
  r"""Smooth Tchebycheff scalarization: descend a smoothed worst task.

  Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for
  Multi-Objective Optimization", ICML 2024 (arXiv:2402.19078). The update is
  the gradient of
  :math:`\mu \log \sum_i \exp(\lambda_i (f_i - z_i) / \mu)`, a smooth
  upper bound of :math:`\max_i \lambda_i (f_i - z_i)` (tight as
  :math:`\mu \to 0`), i.e. :math:`\sum_i w_i g_i` with the weights of
  :func:`stch_weights` (they sum to at most :math:`\max_i \lambda_i
  \partial f_i / \partial l_i`).

  **The reference point.** The paper's :math:`z^\star` is the *ideal* point
  (a lower bound of every objective), here ``reference`` in loss units
  (default 0, the ideal point of non-negative losses; torchjd's ``STCH``
  scalarizer is the same with ``weights=preference, reference=z``). For
  multi-task learning the official code and LibMTL use log-losses
  normalised by a *nadir* point estimated during a warm-up:
  ``log_losses=True, warmup_steps=W``. During the first ``W`` updates the
  update is the gradient of the linear scalarization
  :math:`\sum_i \lambda_i f_i` (with ``log_losses`` and
  ``preference=jnp.ones(T)``, LibMTL's sum of log-losses) and the losses
  are averaged; from update ``W + 1`` on the reference is that average
  (fixed). LibMTL differs in two ways written down here: it averages the
  losses of the last warm-up *epoch* only, and it multiplies the
  scalarization by ``T`` with :math:`\lambda_i = 1`; its update is ``T``
  times ``stch(mu, preference=jnp.ones(T), log_losses=True, ...)``.

  Cost: reads only the losses (no Gram pass; one backward pass on the lean
  path). State: a counter and two ``(T,)`` vectors. Order-free (with the
  preference permuted alike). Scale: with ``log_losses`` the weights scale
  as :math:`1 / l` (the update is invariant to a common scale of losses and
  reference); on raw losses a larger loss scale sharpens the softmax
  towards the worst task.

  Args:
    mu: smoothing parameter ``> 0`` (injectable; LibMTL's default 1.0; the
      paper evaluates 0.01 to 1).
    num_tasks: the task count ``T``.
    preference: ``(T,)`` non-negative preference :math:`\lambda` (default
      uniform ``1/T``, as in the paper and torchjd).
    reference: ``(T,)`` or scalar reference point in loss units (used when
      ``warmup_steps == 0``).
    warmup_steps: number of warm-up updates that estimate the reference.
    log_losses: whether the objectives are the log-losses.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = stch(mu=1.0, num_tasks=2, preference=jnp.ones(2))
    >>> upd, _ = tx.update({"w": jnp.eye(2)}, tx.init(None),
    ...                    task_losses=jnp.array([1., 2.]))
    >>> [round(float(x), 4) for x in upd["w"]]  # softmax([1, 2])
    [0.2689, 0.7311]

  References:
    Lin et al., `Smooth Tchebycheff Scalarization for Multi-Objective Optimization
    <https://openreview.net/forum?id=m4dO5L6eCp>`_, ICML 2024
  """
  check_hyperparameter("mu", mu, low=0.0, low_open=True, method="stch")
  check_num_tasks(num_tasks, "stch", required=True)
  if not isinstance(warmup_steps, jax.core.Tracer):
    ok = isinstance(warmup_steps, (int, np.integer, np.ndarray, jax.Array)) and not isinstance(
      warmup_steps, (bool, np.bool_)
    )
    if ok and isinstance(warmup_steps, (np.ndarray, jax.Array)):
      ok = warmup_steps.ndim == 0 and jnp.issubdtype(warmup_steps.dtype, jnp.integer)
    if not ok or int(warmup_steps) < 0:
      raise ValueError(f"stch: warmup_steps must be a non-negative int, got {warmup_steps!r}")
  for name, value in (("preference", preference), ("reference", reference)):
    if value is not None and jnp.shape(value) not in ((), (num_tasks,)):
      raise ValueError(f"stch: {name} must be a scalar or ({num_tasks},), got {jnp.shape(value)}")
  if preference is not None and not isinstance(preference, jax.core.Tracer):
    if np.any(np.asarray(preference) < 0):
      raise ValueError("stch: preference must be non-negative")

  def init_fn(params):
    dtype = accumulation_dtype(params)
    ref = jnp.where(jnp.asarray(log_losses, bool), 1.0, 0.0) * jnp.ones((num_tasks,), dtype)
    if reference is not None:
      ref = jnp.broadcast_to(jnp.asarray(reference, dtype), (num_tasks,))
    return STCHState(
      count=jnp.zeros((), jnp.int32),
      loss_sum=jnp.zeros((num_tasks,), dtype),
      reference=ref,
    )

  def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
    del gram, extra_args
    dtype = losses.dtype
    lam = (
      jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
      if preference is None
      else jnp.broadcast_to(jnp.asarray(preference, dtype), (num_tasks,))
    )
    w = stch_weights(
      losses,
      mu=mu,
      preference=lam,
      reference=state.reference.astype(dtype),
      log_losses=log_losses,
    )
    warming = state.count < warmup_steps
    _, df = _objective(losses, log_losses)
    w = jnp.where(warming, lam * df, w)
    loss_sum = jnp.where(warming, state.loss_sum + losses, state.loss_sum)
    count = jnp.where(warming, state.count + 1, state.count)
    reference_now = jnp.where(
      warming & (count == warmup_steps), loss_sum / jnp.maximum(warmup_steps, 1), state.reference
    )
    new_state = STCHState(
      count=count.astype(jnp.int32),
      loss_sum=loss_sum.astype(state.loss_sum.dtype),
      reference=reference_now.astype(state.reference.dtype),
    )
    return w, new_state

  return from_weighting(
    Weighting(
      init_fn, weights_fn, name="stch", needs_gram=False, needs_losses=True, num_tasks=num_tasks
    )
  )
