"""Helpers shared by the comparison methods."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_num_tasks(num_tasks: Any, method: str, *,
                    required: bool = False) -> None:
  """Validates the ``num_tasks`` factory argument."""
  if num_tasks is None:
    if required:
      raise ValueError(f"{method}: the state holds per-task arrays; pass "
                       "num_tasks=T")
    return
  if (not isinstance(num_tasks, int) or isinstance(num_tasks, bool)
      or num_tasks < 1):
    raise ValueError(f"{method}: num_tasks must be a positive int, got "
                     f"{num_tasks!r}")


def params_dtype(params: Any) -> jnp.dtype:
  """float32 at least; float64 when the parameters are float64."""
  leaves = jax.tree_util.tree_leaves(params)
  return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in leaves])


def normalize_gram(gram: jax.Array) -> jax.Array:
  """``K / max_i K_ii`` (unchanged when the diagonal is all zero).

  For weightings that are invariant to a global scale of the gradients this
  keeps float32 arithmetic in range for gradients from 1e-10 to 1e10. A
  non-finite Gram stays non-finite.
  """
  top = jnp.max(jnp.clip(jnp.diagonal(gram), 0.0))
  return gram / jnp.where(top > 0, top, 1.0)


def task_permutations(key: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
  """Splits ``key`` and draws one random order of ``range(T)`` per task.

  Returns:
    ``(new_key, perms)`` with ``perms`` of shape ``(T, T)``, row ``i`` a
    permutation used as the visiting order of task ``i``.
  """
  key, sub = jax.random.split(key)
  keys = jax.random.split(sub, t)
  perms = jax.vmap(lambda k: jax.random.permutation(k, t))(keys)
  return key, perms
