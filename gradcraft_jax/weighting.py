"""The shared core: Gram matrix -> task weights -> weighted sum.

Every Gram-based method in the library is built by :func:`from_weighting`
from two small functions:

* ``init_fn(params) -> state``: the method's state (``optax.EmptyState()``
  for stateless methods);
* ``weights_fn(gram, state, task_losses, extra_args) -> (weights, state)``:
  maps the ``(T, T)`` Gram matrix of the stacked gradients (``None`` when the
  method declares ``needs_gram=False``), the ``(T,)`` task losses (``None``
  unless the method declares ``needs_losses=True``) and the state to ``(T,)``
  task weights and the new state.

The update is then ``sum_i weights[i] * g_i``: two reads of the stacked
gradients, ``O(T^3)`` extra work, nothing of size ``T x T x d``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcraft_jax._stacked import (accumulation_dtype, gram_matrix,
                                    is_concrete_number, num_tasks,
                                    weighted_sum)

__all__ = ["from_weighting", "check_hyperparameter", "pinv_psd",
           "gram_scale", "normalize_gram",
           "WeightsFn", "empty_init", "task_weights"]

WeightsFn = Callable[[Any, Any, Any, dict], tuple[jax.Array, Any]]


def check_hyperparameter(name: str, value: Any, *, low: float | None = None,
                         high: float | None = None,
                         low_open: bool = False,
                         high_open: bool = False,
                         method: str = "") -> None:
  """Raises ``ValueError`` when a concrete hyperparameter is out of range.

  Arrays and tracers (for instance from ``optax.inject_hyperparams``) are not
  checked: their values are not known at construction.
  """
  if not is_concrete_number(value):
    return
  v = float(value)
  prefix = f"{method}: " if method else ""
  if not np.isfinite(v):
    raise ValueError(f"{prefix}{name} must be finite, got {value!r}")
  if low is not None and (v < low or (low_open and v == low)):
    rel = ">" if low_open else ">="
    raise ValueError(f"{prefix}{name} must be {rel} {low}, got {value!r}")
  if high is not None and (v > high or (high_open and v == high)):
    rel = "<" if high_open else "<="
    raise ValueError(f"{prefix}{name} must be {rel} {high}, got {value!r}")


def gram_scale(gram: jax.Array) -> jax.Array:
  """``max_i K_ii``, or 1 when the diagonal is all zero."""
  top = jnp.max(jnp.clip(jnp.diagonal(gram), 0.0))
  return jnp.where(top > 0, top, 1.0)


def normalize_gram(gram: jax.Array) -> jax.Array:
  """``K / max_i K_ii`` (unchanged when the diagonal is all zero).

  For weightings that are invariant to a global scale of the gradients this
  keeps float32 arithmetic in range for gradients from 1e-10 to 1e10. A
  non-finite Gram stays non-finite.
  """
  return gram / gram_scale(gram)


def pinv_psd(a: jax.Array, rcond: float | None = None) -> jax.Array:
  """Moore-Penrose pseudo-inverse of a symmetric PSD matrix via ``eigh``.

  Eigenvalues below ``rcond * max|eigenvalue|`` (default ``10 * n * eps``)
  are treated as zero, which gives the minimum-norm solution of singular
  systems and maps all-zero rows/columns (masked-out tasks) to zero.
  Works on batches with ``jax.vmap``.
  """
  n = a.shape[-1]
  if rcond is None:
    rcond = 10 * n * float(jnp.finfo(a.dtype).eps)
  evals, evecs = jnp.linalg.eigh(0.5 * (a + a.T))
  cutoff = rcond * jnp.max(jnp.abs(evals))
  keep = evals > cutoff
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  return (evecs * inv) @ evecs.T


def from_weighting(
    init_fn: Callable[[Any], Any],
    weights_fn: WeightsFn,
    *,
    name: str,
    needs_losses: bool = False,
    needs_gram: bool = True,
    expected_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds an optax transform from a Gram-space weighting.

  Args:
    init_fn: ``params -> state``.
    weights_fn: ``(gram, state, task_losses, extra_args) -> (weights, state)``
      with ``gram`` of shape ``(T, T)`` (or ``None`` if ``needs_gram`` is
      false), ``task_losses`` of shape ``(T,)`` (or ``None`` if
      ``needs_losses`` is false) and ``weights`` of shape ``(T,)``.
    name: the method's name, used in error messages.
    needs_losses: whether ``update`` requires the keyword ``task_losses``.
    needs_gram: whether ``weights_fn`` reads the Gram matrix.
    expected_tasks: if given, the task count the state was built for;
      updates with another ``T`` raise ``ValueError``. Stateful methods
      should read ``num_tasks`` only in ``init_fn`` (where it is concrete,
      also under ``optax.inject_hyperparams``) and take shapes from the state
      in ``weights_fn``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    stacked per-task gradients (leading axis ``T`` on every leaf) and returns
    ``sum_i w_i g_i`` (a pytree like the parameters, in the input dtypes).
  """

  def weights_of(updates, state, *, task_losses=None, **extra_args):
    """``(stacked, state) -> (weights (T,), new_state)``: the weighting
    alone (the update is ``weighted_sum(stacked, weights)``)."""
    t = num_tasks(updates)
    # under optax.inject_hyperparams an int num_tasks arrives traced in
    # update; the state's shapes still carry it, so only check concrete ones
    if (expected_tasks is not None and is_concrete_number(expected_tasks)
        and t != int(expected_tasks)):
      raise ValueError(
          f"{name}: built for num_tasks={expected_tasks} but the stacked "
          f"gradients have {t} tasks on their leading axis")
    losses = None
    if needs_losses:
      if task_losses is None:
        raise ValueError(
            f"{name} needs the per-task losses: call "
            "update(updates, state, params, task_losses=losses) with a "
            f"({t},) array")
      losses = jnp.asarray(task_losses)
      if losses.shape != (t,):
        raise ValueError(
            f"{name}: task_losses has shape {losses.shape}, expected ({t},) "
            "to match the task axis of the stacked gradients")
      losses = losses.astype(accumulation_dtype(updates))
    gram = gram_matrix(updates) if needs_gram else None
    return weights_fn(gram, state, losses, extra_args)

  def update_fn(updates, state, params=None, *, task_losses=None,
                **extra_args):
    del params
    weights, new_state = weights_of(updates, state, task_losses=task_losses,
                                    **extra_args)
    return weighted_sum(updates, weights), new_state

  # The weighting stays reachable for reuse (see :func:`task_weights`).
  update_fn.weights = weights_of
  update_fn.method_name = name
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def task_weights(tx: optax.GradientTransformation, stacked: Any, state: Any,
                 *, task_losses: Any = None,
                 **extra_args) -> tuple[jax.Array, Any]:
  """The task weights a transform built by :func:`from_weighting` would use.

  Every such transform's update is ``sum_i w_i g_i``; this returns ``w``
  (and the new state) without forming the weighted sum, e.g. to weight the
  task losses of a single backward pass (see
  :mod:`gradcraft_jax.representation`).

  Args:
    tx: a transform returned by :func:`from_weighting` (every method
      factory of the library), not an ``optax.chain`` of it.
    stacked: stacked per-task gradients (leading axis ``T``) of any pytree
      structure: the weights depend on them only through their Gram matrix.
    state: ``tx``'s state.
    task_losses: ``(T,)`` losses, for methods that need them.
    **extra_args: passed on like ``update``'s extra arguments.

  Returns:
    ``(weights, new_state)`` with ``weights`` of shape ``(T,)``.

  Raises:
    TypeError: if ``tx`` was not built by :func:`from_weighting`.
  """
  weights_of = getattr(getattr(tx, "update", None), "weights", None)
  if weights_of is None:
    raise TypeError(
        "task_weights needs a transform built by gradcraft_jax."
        "from_weighting (a method factory such as gradcraft() or mgda()), "
        f"got {type(tx).__name__} whose update has no weighting; for an "
        "optax.chain pass the multi-task transform itself")
  return weights_of(stacked, state, task_losses=task_losses, **extra_args)


def empty_init(params: Any) -> optax.EmptyState:
  """``init_fn`` of stateless methods."""
  del params
  return optax.EmptyState()
