"""Fault injection: NaN and Inf in random batches never poison a run.

For every method of the registry (plus GradCraft with averaged norms and
NMT, the two stateful headline configurations), a short training run of the
tiny two-task model of ``test_compat_matrix`` under
``gradcraft_jax.apply_if_finite(optax.chain(method, optax.adam(...)), 2)``
(the compiled step of the matrix's ``apply_if_finite`` cell, reused)
gets NaN or Inf injected into the gradients, the losses or both at random
steps. After every bad step the parameters and every state are unchanged;
at the end everything is finite, the skip count is the number of bad steps,
every good step equals one step of the plain chain from the same parameters
and state (so the run is the plain chain's run on the good batches alone,
compared step by step: a 40-step trajectory of an iterative solver such as
CAGrad's amplifies rounding differences between the two compiled programs,
which depend on the CPU), and every task's loss has improved (the mean loss
only, for methods that follow a subset of the tasks by design: Krum).

The methods alone: a non-finite input gives a visibly non-finite update and
the method's state is kept (or at least stays finite), and an empty tree
passes through.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_cases import CASES, MethodCase
from test_compat_matrix import (
  CASE,
  T,
  compiled,
  extra_args,
  grads_of,
  init_params,
  make_batch,
  reads_what_was_poisoned,
  same_tree,
  task_losses_fn,
)

import gradcraft_jax as gj

FAULT_CASES = list(CASES) + [
  MethodCase("gradcraft_norm_decay", lambda t: gj.gradcraft(0.5, 0.1, 0.9, num_tasks=t)),
  MethodCase(
    "nmt",
    lambda t: gj.nmt([0.5] * (t - 1), lagrange_lr=0.1, lagrange_clip=5.0),
    needs_losses=True,
  ),
]
FAULT_IDS = [c.name for c in FAULT_CASES]
CASE.update({c.name: c for c in FAULT_CASES})  # the matrix's cache builds them too
STEPS = 40
# Methods that by design follow a subset of the tasks at each step, so some
# task's loss may rise even in a clean run: Krum returns the single task
# gradient closest to the others.
SUBSET_OF_TASKS = {"krum"}
MAX_ERRORS = 2  # the matrix's apply_if_finite cell
KINDS = ("grads_nan", "grads_inf", "losses_nan", "losses_inf", "both_nan", "both_inf")


def inject(grads, losses, kind, rng):
  """Puts NaN / Inf into a random gradient entry and/or a random loss."""
  bad = jnp.nan if kind.endswith("nan") else (jnp.inf if rng.random() < 0.5 else -jnp.inf)
  if kind.startswith(("grads", "both")):
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    i = int(rng.integers(len(leaves)))
    flat = leaves[i].reshape(-1)
    flat = flat.at[int(rng.integers(flat.size))].set(bad)
    leaves[i] = flat.reshape(leaves[i].shape)
    grads = jax.tree_util.tree_unflatten(treedef, leaves)
  if kind.startswith(("losses", "both")):
    losses = losses.at[int(rng.integers(T))].set(bad)
  return grads, losses


def bad_schedule(rng):
  """Random bad steps in [3, STEPS - 8), at most 2 in a row (below
  MAX_ERRORS, so every one of them is skipped), with a random kind each."""
  steps = []
  for s in sorted(rng.choice(np.arange(3, STEPS - 8), size=8, replace=False)):
    if len(steps) >= 2 and steps[-1] == s - 1 and steps[-2] == s - 2:
      continue
    steps.append(int(s))
  return {s: KINDS[int(rng.integers(len(KINDS)))] for s in steps}


def assert_finite(tree, what):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact):
      assert np.all(np.isfinite(leaf)), f"{what}{jax.tree_util.keystr(path)} is not finite"


def same(a, b):
  """Same tree structure and every leaf equal (NaN differs from NaN)."""
  return same_tree(a, b)


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
def test_training_survives_injected_faults(case):
  rng = np.random.default_rng(FAULT_IDS.index(case.name))
  tx, step = compiled("aif_library", case.name)
  _, dyn = extra_args(case)
  schedule = bad_schedule(rng)
  params = init_params()
  state = tx.init(params)
  eval_batch = make_batch(np.random.default_rng(1234), n=256)
  start = np.asarray(task_losses_fn(params, *eval_batch))
  _, clean_step = compiled("chain", case.name)
  for s in range(STEPS):
    batch = make_batch(rng)
    losses, grads = grads_of(params, batch)
    if s in schedule:
      grads, losses = inject(grads, losses, schedule[s], rng)
    new_params, new_state, _ = step(params, state, grads, losses, dyn)
    if s in schedule:
      assert same(new_params, params), f"step {s} ({schedule[s]}) changed the parameters"
      assert same(new_state.inner_state, state.inner_state), f"step {s} changed a state"
      assert not bool(new_state.last_finite)
    else:
      assert bool(new_state.last_finite), f"finite step {s} was rejected"
      # The bad batches left no trace: this step is the plain chain's step
      # from the same parameters and state.
      clean_params, clean_state, _ = clean_step(params, state.inner_state, grads, losses, dyn)
      chex.assert_trees_all_close(new_params, clean_params, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(new_state.inner_state, clean_state, rtol=1e-5, atol=1e-6)
    assert_finite(new_params, "params")
    assert_finite(new_state, "state")
    params, state = new_params, new_state
  assert int(state.total_notfinite) == len(schedule)
  assert int(state.notfinite_count) == 0
  end = np.asarray(task_losses_fn(params, *eval_batch))
  assert np.mean(end) < 0.5 * np.mean(start), f"task losses {start} -> {end}"
  if case.name not in SUBSET_OF_TASKS:
    assert np.all(end < start), f"task losses {start} -> {end}"


def _bad_inputs(case, kind):
  params = init_params()
  losses, grads = grads_of(params, make_batch(np.random.default_rng(0)))
  grads, losses = inject(grads, losses, kind, np.random.default_rng(1))
  return params, grads, losses


@pytest.mark.parametrize("kind", ["both_nan", "both_inf", "grads_nan", "losses_nan"])
@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
def test_method_alone_keeps_its_state(case, kind):
  # the matrix's compiled optax.chain(method, adam) step; its state[0] is the
  # method's. One finite step first, so the state is not the initial one.
  tx, step = compiled("chain", case.name)
  _, dyn = extra_args(case)
  params = init_params()
  losses, grads = grads_of(params, make_batch(np.random.default_rng(5)))
  _, state, _ = step(params, tx.init(params), grads, losses, dyn)
  _, bad_grads, bad_losses = _bad_inputs(case, kind)
  _, new_state, update = step(params, state, bad_grads, bad_losses, dyn)
  assert_finite(new_state[0], "method state")  # never poisoned
  if kind.startswith("both") and not same(new_state[0], state[0]):
    # what every weighting reads is non-finite: the state is kept, unless
    # the method reads neither the gradients' Gram matrix nor the losses
    assert not reads_what_was_poisoned(case.name)
  if kind.startswith(("both", "grads")):  # the update is visibly non-finite
    assert not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(update))


def test_norm_ema_and_nmt_multipliers_stay_finite_after_a_bad_batch():
  # the state of GradCraft's norm averages and NMT's multipliers survives a
  # batch whose gradients and losses are NaN
  params = init_params()
  losses, grads = grads_of(params, make_batch(np.random.default_rng(0)))
  bad_grads, bad_losses = inject(grads, losses, "both_nan", np.random.default_rng(0))
  tx = optax.chain(
    gj.gradcraft(norm_decay=0.9, num_tasks=T), optax.apply_if_finite(optax.adam(0.1), 2)
  )
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  _, state = tx.update(bad_grads, state, params)
  assert np.all(np.isfinite(np.asarray(state[0].norm_ema)))
  upd, state = tx.update(grads, state, params)
  assert int(state[1].notfinite_count) == 0
  assert_finite(upd, "update")
  nmt = gj.nmt([0.5] * (T - 1), lagrange_lr=0.1, lagrange_clip=5.0)
  s = nmt.init(params)
  _, s = nmt.update(grads, s, task_losses=bad_losses)
  assert np.all(np.isfinite(np.asarray(s.multipliers)))


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
def test_empty_tree_passes_through(case):
  tx = case.make(T)
  static, dyn = extra_args(case)
  state = tx.init({})
  for empty in ({}, [], None):
    out, new_state = tx.update(empty, state, None, task_losses=jnp.ones(T), **static, **dyn)
    assert out == empty
    assert same(new_state, state)
