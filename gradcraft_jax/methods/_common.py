"""Helpers shared by the comparison methods."""

from __future__ import annotations

from typing import Any

import jax


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
