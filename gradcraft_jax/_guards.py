"""Internal: validation of task counts, finiteness checks and keep-the-state
rules shared by every transform of the library."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import num_tasks


def all_finite(*trees: Any) -> jax.Array:
  """Whether every leaf of every tree (``None`` skipped) is finite: a boolean
  scalar."""
  ok = jnp.array(True)
  for leaf in jax.tree_util.tree_leaves(trees):
    ok = ok & jnp.all(jnp.isfinite(leaf))
  return ok


def keep_state_unless(ok: jax.Array, new_state: Any, state: Any) -> Any:
  """``new_state`` where ``ok`` (a boolean scalar), else the previous
  ``state``: the library's rule for non-finite input."""
  return jax.tree_util.tree_map(
    lambda new, old: jnp.where(ok, new, old).astype(jnp.result_type(new)), new_state, state
  )


def nan_unless(ok: jax.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, else NaN of the same shapes and dtypes."""
  return jax.tree_util.tree_map(lambda x: jnp.where(ok, x, jnp.nan).astype(x.dtype), tree)


def check_task_count(stacked: Any, name: str, expected: int | None) -> int:
  """``T`` of stacked gradients, checked against the count a transform was
  built for (``None``: any)."""
  t = num_tasks(stacked)
  if expected is not None and t != int(expected):
    raise ValueError(
      f"{name}: built for num_tasks={expected} but the stacked gradients have {t} tasks "
      "on their leading axis"
    )
  return t
