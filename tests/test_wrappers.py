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


def test_robustness_page_examples_run():
  from test_docs_examples import run_page

  run_page("robustness.md")


# --------------------------------------------------------------- apply_if_finite


def _flags(values):
  return [{"w": jnp.full((3,), v, jnp.float32)} for v in values]


def test_apply_if_finite_matches_optax_on_parameter_shaped_updates():
  # on a parameter-shaped chain the library's wrapper is optax's
  # (at most max_consecutive_errors bad steps in a row: beyond that optax
  # applies the update and poisons Adam, after which optax counts finite
  # inputs as finite steps while the library also sees the non-finite output)
  seq = _flags([1.0, np.nan, 2.0, np.inf, np.nan, 3.0, -1.0, np.nan, 0.5])
  params = {"w": jnp.zeros(3)}
  ours, theirs = gj.apply_if_finite(optax.adam(0.1), 2), optax.apply_if_finite(optax.adam(0.1), 2)
  s1, s2 = ours.init(params), theirs.init(params)
  for g in seq:
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = theirs.update(g, s2, params)
    np.testing.assert_array_equal(u1["w"], u2["w"])
    for f in ("notfinite_count", "last_finite", "total_notfinite"):
      assert int(getattr(s1, f)) == int(getattr(s2, f)), f
    chex.assert_trees_all_equal(s1.inner_state, s2.inner_state)


def test_apply_if_finite_applies_after_max_consecutive_errors_and_checks_output():
  params = {"w": jnp.zeros(3)}
  tx = gj.apply_if_finite(optax.sgd(1.0), 2)
  state = tx.init(params)
  for i, g in enumerate(_flags([np.nan, np.nan, np.nan])):
    upd, state = tx.update(g, state, params)
    assert int(state.notfinite_count) == i + 1
    assert np.all(np.isnan(upd["w"])) == (i == 2)  # the third is applied, as optax
  # a finite input whose update is not finite (overflow in the chain) is skipped
  tx = gj.apply_if_finite(optax.scale(1e30), 2)
  upd, state = tx.update({"w": jnp.full(3, 1e20)}, tx.init(params), params)
  assert np.all(upd["w"] == 0) and int(state.total_notfinite) == 1


def test_apply_if_finite_skips_non_finite_losses_and_keeps_method_state():
  params, stacked = tower_problem(np.random.default_rng(5))
  tx = gj.apply_if_finite(optax.chain(gj.dwa(2.0, num_tasks=T), optax.sgd(1.0)), 1)
  state = tx.init(params)
  losses = jnp.array([1.0, 2.0, 3.0])
  _, state = tx.update(stacked, state, params, task_losses=losses)
  before = state.inner_state
  upd, state = tx.update(stacked, state, params, task_losses=losses.at[0].set(jnp.nan))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(upd))
  chex.assert_trees_all_equal(state.inner_state, before)
  assert int(state.total_notfinite) == 1


def test_apply_if_finite_under_jit_with_stacked_input():
  params, stacked = tower_problem(np.random.default_rng(6))
  tx = gj.apply_if_finite(optax.chain(gj.gradcraft(0.5, 0.1), optax.adam(0.1)), 0)
  state = tx.init(params)
  bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), stacked)
  upd, state = jax.jit(tx.update)(bad, state, params)
  # max_consecutive_errors=0: as optax, the first bad step is applied anyway
  assert int(state.notfinite_count) == 1
  assert not np.all(np.isfinite(np.asarray(upd["bottom"]["kernel"])))


# ------------------------------------------------------------------ MultiSteps


def test_multisteps_mean_equals_optax_multisteps_after_mean():
  # mean() is linear: accumulating stacked gradients then averaging tasks
  # is optax.MultiSteps on the averaged updates
  rng = np.random.default_rng(7)
  params = {"w": jnp.zeros(4)}
  ours = gj.MultiSteps(optax.chain(gj.mean(), optax.adam(0.1)), 3, num_tasks=2)
  ref = optax.chain(gj.mean(), optax.MultiSteps(optax.adam(0.1), 3).gradient_transformation())
  s1, s2 = ours.init(params), ref.init(params)
  for i in range(7):
    g = {"w": jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)}
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-5, atol=1e-7)
    assert bool(ours.has_updated(s1)) == ((i + 1) % 3 == 0)


def _probe_weighting():
  # weights = the losses it is given times an extra argument: shows what
  # MultiSteps hands to the inner chain
  def weights(gram, state, losses, *, num_tasks, scale=1.0, **extra_args):
    return losses * scale, state

  return gj.from_weighting(
    gj.Weighting(
      lambda p: optax.EmptyState(), weights, name="probe", needs_gram=False, needs_losses=True
    )
  )


def test_multisteps_averages_gradients_and_losses_and_passes_last_extra():
  rng = np.random.default_rng(8)
  params = {"w": jnp.zeros(3)}
  ms = gj.MultiSteps(_probe_weighting(), lambda step: 2, num_tasks=2)
  state = ms.init(params)
  gs = [jnp.asarray(rng.standard_normal((2, 3)), jnp.float32) for _ in range(2)]
  ls = [jnp.array([1.0, 2.0]), jnp.array([3.0, 6.0])]
  upd, state = ms.update({"w": gs[0]}, state, params, task_losses=ls[0], scale=10.0)
  np.testing.assert_array_equal(upd["w"], np.zeros(3))
  upd, state = jax.jit(ms.update)({"w": gs[1]}, state, params, task_losses=ls[1], scale=0.5)
  g_mean = (np.asarray(gs[0]) + np.asarray(gs[1])) / 2
  l_mean = np.array([2.0, 4.0])
  np.testing.assert_allclose(upd["w"], 0.5 * l_mean @ g_mean, rtol=1e-5)
  assert int(state.mini_step) == 0 and int(state.gradient_step) == 1
  np.testing.assert_array_equal(state.acc_losses, np.zeros(2))
  np.testing.assert_array_equal(state.acc_grads["w"], np.zeros((2, 3)))


def test_multisteps_checks_task_count_and_losses():
  ms = gj.MultiSteps(optax.chain(gj.mean(), optax.sgd(1.0)), 2, num_tasks=2)
  state = ms.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="num_tasks=2"):
    ms.update({"w": jnp.zeros((3, 3))}, state)
  with pytest.raises(ValueError, match="task_losses"):
    ms.update({"w": jnp.zeros((2, 3))}, state, task_losses=jnp.ones(3))
  assert ms.inner_opt is not None
  tx = ms.gradient_transformation()
  upd, _ = tx.update({"w": jnp.ones((2, 3))}, tx.init({"w": jnp.zeros(3)}))
  assert upd["w"].shape == (3,)


def test_optax_wrappers_fail_with_a_pointer_to_the_library():
  params, stacked = tower_problem(np.random.default_rng(9))
  tx = optax.MultiSteps(optax.chain(gj.gradcraft(), optax.adam(1e-3)), 2)
  with pytest.raises(ValueError, match="gradcraft_jax.MultiSteps"):
    tx.update(stacked, tx.init(params), params)
  with pytest.raises(ValueError, match="gradcraft_jax.apply_if_finite"):
    gj.mean().update({"a": jnp.zeros((2, 3)), "b": jnp.zeros((4,))}, optax.EmptyState())
