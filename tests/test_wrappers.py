"""Tests of gradcraft_jax.wrappers: task_sum, label_by_path, shared_only,
apply_if_finite and MultiSteps (references are plain NumPy / direct calls)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcraft_jax as gj

T = 3


def tower_problem(rng, t=T):
  """Params with a shared bottom and one tower per task, and the stacked
  gradients of a per-task loss (towers: zero rows except their own task)."""
  params = {
    "bottom": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
    "towers": [{"w": jnp.zeros(3)} for _ in range(t)],
  }
  stacked = {
    "bottom": {
      "kernel": jnp.asarray(rng.normal(size=(t, 4, 3)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(t, 3)), jnp.float32),
    },
    "towers": [
      {"w": jnp.asarray(np.eye(t)[:, i : i + 1] * rng.normal(size=(t, 3)), jnp.float32)}
      for i in range(t)
    ],
  }
  return params, stacked


def test_task_sum_is_sum_over_tasks():
  rng = np.random.default_rng(0)
  _, stacked = tower_problem(rng)
  tx = gj.task_sum()
  out, state = tx.update(stacked, tx.init(None), task_losses=jnp.ones(T))
  chex.assert_trees_all_close(out, jax.tree_util.tree_map(lambda x: np.sum(x, 0), stacked))
  # a tower gets exactly its own task's gradient
  for i in range(T):
    np.testing.assert_array_equal(out["towers"][i]["w"], stacked["towers"][i]["w"][i])
  assert tx.update({}, state) == ({}, state)


def test_task_sum_bf16_keeps_dtype():
  g = {"a": jnp.ones((T, 5), jnp.bfloat16)}
  out, _ = gj.task_sum().update(g, optax.EmptyState())
  assert out["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32), np.full(5, T, np.float32))


def test_task_sum_inconsistent_axis_raises():
  with pytest.raises(ValueError, match="task axis"):
    gj.task_sum().update({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, optax.EmptyState())


def test_label_by_path_callable_regex_and_labels():
  params = {"bottom": {"kernel": 0, "bias": 0}, "towers": [{"w": 0}, {"w": 0}]}
  want = {"bottom": {"kernel": True, "bias": True}, "towers": [{"w": False}, {"w": False}]}
  assert gj.label_by_path(params, lambda p: p.startswith("['bottom']")) == want
  assert gj.label_by_path(params, r"^\['bottom'\]") == want
  assert gj.label_by_path(params, ["kernel", "bias"]) == want
  labels = gj.label_by_path(params, "bottom", labels=("s", "t"))
  assert labels == {"bottom": {"kernel": "s", "bias": "s"}, "towers": [{"w": "t"}, {"w": "t"}]}
  with pytest.raises(TypeError, match="Python bool"):
    gj.label_by_path(params, lambda p: "x")
  with pytest.raises(TypeError, match="callable"):
    gj.label_by_path(params, 3)


@pytest.mark.parametrize("method", ["gradcraft", "mgda", "mean"])
@pytest.mark.parametrize("mask_kind", ["callable", "tree", "prefix"])
def test_shared_only_equals_method_on_shared_plus_sum_on_towers(method, mask_kind):
  rng = np.random.default_rng(1)
  params, stacked = tower_problem(rng)
  make = {
    "gradcraft": lambda: gj.gradcraft(0.5, 0.1, norm_decay=0.9, num_tasks=T),
    "mgda": lambda: gj.mgda(),
    "mean": lambda: gj.mean(),
  }[method]
  mask = {
    "callable": lambda p: gj.label_by_path(p, "bottom"),
    "tree": gj.label_by_path(params, "bottom"),
    "prefix": {"bottom": True, "towers": False},
  }[mask_kind]
  tx = gj.shared_only(make(), mask)
  state = tx.init(params)
  ref = make()
  ref_state = ref.init(params["bottom"])
  for _ in range(2):  # twice: the method's state is carried
    out, state = jax.jit(tx.update)(stacked, state, params)
    ref_bottom, ref_state = ref.update(stacked["bottom"], ref_state)
    chex.assert_trees_all_close(out["bottom"], ref_bottom, rtol=1e-5, atol=1e-6)
    for i in range(T):
      np.testing.assert_allclose(out["towers"][i]["w"], stacked["towers"][i]["w"][i])
  chex.assert_trees_all_close(state.inner_state, ref_state)


def test_shared_only_differs_from_whole_model():
  # the Gram matrix over shared leaves only differs from the whole model's
  rng = np.random.default_rng(2)
  params, stacked = tower_problem(rng)
  tx = gj.shared_only(gj.mgda(), {"bottom": True, "towers": False})
  out, _ = tx.update(stacked, tx.init(params))
  whole, _ = gj.mgda().update(stacked, optax.EmptyState())
  assert not np.allclose(out["bottom"]["kernel"], whole["bottom"]["kernel"])


def test_shared_only_all_task_specific_and_empty():
  rng = np.random.default_rng(3)
  params, stacked = tower_problem(rng)
  tx = gj.shared_only(gj.gradcraft(0.5, 0.1, norm_decay=0.9, num_tasks=T), False)
  state = tx.init(params)
  out, new_state = tx.update(stacked, state)
  chex.assert_trees_all_close(out, jax.tree_util.tree_map(lambda x: np.sum(x, 0), stacked))
  chex.assert_trees_all_equal(new_state, state)
  empty = gj.shared_only(gj.mgda(), True)
  s = empty.init({})
  assert empty.update({}, s)[0] == {}


def test_shared_only_passes_task_losses_and_checks_structure():
  rng = np.random.default_rng(4)
  params, stacked = tower_problem(rng)
  tx = gj.shared_only(gj.imtl(0.1, num_tasks=T), {"bottom": True, "towers": False})
  state = tx.init(params)
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(stacked, state)
  tx.update(stacked, state, task_losses=jnp.ones(T))
  with pytest.raises(ValueError, match="leaves"):
    tx.update({"bottom": stacked["bottom"]}, state)
  with pytest.raises(TypeError, match="Python bools"):
    gj.shared_only(gj.mgda(), lambda p: jax.tree_util.tree_map(jnp.any, p)).init(params)
