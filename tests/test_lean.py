"""combined_value_and_grad (the lean step) against the stacked path.

The reference is the stacked path itself, built from independent pieces:
``per_task_value_and_grad`` (checked against ``jax.jacrev`` in
``test_per_task.py``) followed by ``method.update`` on the stacked gradients.
The lean step never forms the stacked gradients and pulls back the weights
once, so it must agree to floating-point rounding, for every method of the
registry, over several steps (states included).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from method_cases import CASES, IDS

import gradcraft_jax as gj

# Methods with a documented solver accuracy coarser than rounding (see
# test_method_properties.SOLVER_TOL): a 1-ulp difference in the Gram matrix
# may move their fixed-iteration float32 solution by this much (relative).
SOLVER_TOL = {"cagrad": 5e-3, "nash_mtl": 1e-3}
CASE = dict(zip(IDS, CASES))
# The lean step needs task weights: methods that are their own transforms
# (MethodCase.weighting false) are outside it (task_weights raises TypeError).
LEAN_IDS = [c.name for c in CASES if c.weighting]
STEPS = 3


def mlp_params(t, hidden, rng, dtype):
  return {
    "w1": jnp.asarray(rng.normal(size=(16, hidden)) / 4.0, dtype),
    "b1": jnp.asarray(0.1 * rng.normal(size=(hidden,)), dtype),
    "w2": jnp.asarray(rng.normal(size=(hidden, t)) / np.sqrt(hidden), dtype),
  }


def mlp_losses(params, x, y):
  """Shared tanh layer + linear head per task: (T,) MSE losses. With 6 rows
  and 16 input features the lean step (T >= 2) takes ``w1``'s Gram block from the
  dense-layer identity and the others' from their pullbacks (asserted in
  ``test_mixed_gram_routes``), so every method is checked on both routes."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2, axis=0)


def mlp_losses_aux(params, x, y):
  losses = mlp_losses(params, x, y)
  return losses, {"total": jnp.sum(losses), "x0": x[0]}


@functools.lru_cache(maxsize=None)
def _steps(name, t, has_aux=False, argnums=0):
  """``(method, both)`` where ``both`` is one jitted function (one compile
  per method and T, shared by the hypothesis examples) returning the lean
  step's ``(value, grads, new_state)`` and the stacked path's."""
  method = CASE[name].make(t)
  fun = mlp_losses_aux if has_aux else mlp_losses
  lean = gj.combined_value_and_grad(fun, method, argnums=argnums, has_aux=has_aux)
  per_task = gj.per_task_value_and_grad(fun, argnums=argnums, has_aux=has_aux)

  def stacked(params, state, x, y, extra):
    value, g = per_task(params, x, y)
    losses = value[0] if has_aux else value
    diff = params if argnums == 0 else tuple((params, x, y)[i] for i in argnums)
    upd, new_state = method.update(g, state, diff, task_losses=losses, **extra)
    return value, upd, new_state

  def both(params, state, x, y, extra):
    return lean(params, state, x, y, **extra), stacked(params, state, x, y, extra)

  return method, jax.jit(both)


def _data(t, rng, dtype, batch=6, hidden=5):
  params = mlp_params(t, hidden, rng, dtype)
  x = jnp.asarray(rng.normal(size=(batch, 16)), dtype)
  y = jnp.asarray(rng.normal(size=(batch, t)), dtype)
  return params, x, y


def _extra(case, t, rng):
  return case.extra(t, rng) if case.extra is not None else {}


def _assert_close(a, b, rtol):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
    if np.issubdtype(x.dtype, np.floating):
      scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
      np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)
    else:
      np.testing.assert_array_equal(x, y)


def _task_count(name, offset):
  """T for a method: spread over 1..12 across the registry (5 is coprime to
  12), so that every T is covered with one compile per method."""
  t = 1 + (5 * IDS.index(name) + offset) % 12
  # Krum needs T >= n_byzantine + 3 (its default n_byzantine is 1)
  return max(t, 4) if name == "krum" else t


def _run_and_compare(name, seed, dtype, rtol, offset):
  """STEPS steps from the same points (states included), then one step with
  a NaN target: non-finite losses in, non-finite gradient out, same kept
  state as the stacked path."""
  case = CASE[name]
  t = _task_count(name, offset)
  rng = np.random.default_rng(seed)
  method, both = _steps(name, t)
  params, x, y = _data(t, rng, dtype)
  extra = _extra(case, t, rng)
  state = method.init(params)
  for _ in range(STEPS):
    (losses, grads, new_state), (ref_losses, ref_grads, ref_state) = both(
      params, state, x, y, extra
    )
    _assert_close(losses, ref_losses, rtol)
    _assert_close(grads, ref_grads, rtol)
    _assert_close(new_state, ref_state, rtol)
    # Both continue from the same point so that the states stay comparable.
    state = ref_state
    params = jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, params, ref_grads)

  y_bad = y.at[0, t - 1].set(jnp.nan)
  (losses, grads, new_state), (_, ref_grads, ref_state) = both(params, state, x, y_bad, extra)
  assert not np.all(np.isfinite(np.asarray(losses)))
  for tree in (grads, ref_grads):
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(tree)]
    assert not all(np.all(np.isfinite(g)) for g in leaves)
  _assert_close(new_state, ref_state, rtol)


@pytest.mark.parametrize("name", LEAN_IDS)
@settings(max_examples=3)
@given(seed=st.integers(0, 2**32 - 1))
def test_equals_stacked_float32(name, seed):
  _run_and_compare(name, seed, jnp.float32, SOLVER_TOL.get(name, 2e-4), offset=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEAN_IDS)
@settings(max_examples=2)
@given(seed=st.integers(0, 2**32 - 1))
def test_equals_stacked_float64(name, seed):
  with jax.enable_x64(True):
    _run_and_compare(name, seed, jnp.float64, 1e-8, offset=7)


@pytest.mark.parametrize("name", ["gradcraft", "nmt"])
def test_has_aux(name):
  t = 3
  if name == "nmt":
    method = gj.nmt(targets=[0.5] * (t - 1), lagrange_lr=0.1, lagrange_clip=10.0)
    lean = jax.jit(gj.combined_value_and_grad(mlp_losses_aux, method, has_aux=True))
    rng = np.random.default_rng(0)
    params, x, y = _data(t, rng, jnp.float32)
    state = method.init(params)
    (losses, aux), grads, new_state = lean(params, state, x, y)
    per_task = gj.per_task_value_and_grad(mlp_losses_aux, has_aux=True)

    @jax.jit
    def stacked(params, state, x, y):
      (ref_losses, ref_aux), g = per_task(params, x, y)
      ref, ref_state = method.update(g, state, params, task_losses=ref_losses)
      return (ref_losses, ref_aux), ref, ref_state

    (ref_losses, ref_aux), ref, ref_state = stacked(params, state, x, y)
  else:
    method, both = _steps(name, t, has_aux=True)
    rng = np.random.default_rng(0)
    params, x, y = _data(t, rng, jnp.float32)
    state = method.init(params)
    ((losses, aux), grads, new_state), ((ref_losses, ref_aux), ref, ref_state) = both(
      params, state, x, y, {}
    )
  _assert_close(losses, ref_losses, 1e-6)
  _assert_close(aux, ref_aux, 1e-6)
  _assert_close(grads, ref, 2e-4)
  _assert_close(new_state, ref_state, 2e-4)


@pytest.mark.parametrize("name", ["upgrad", "dwa"])
def test_argnums_tuple(name):
  t = 4
  method, both = _steps(name, t, argnums=(0, 1))
  rng = np.random.default_rng(1)
  params, x, y = _data(t, rng, jnp.float32)
  state = method.init(params)
  (_, grads, new_state), (_, ref, ref_state) = both(params, state, x, y, {})
  assert isinstance(grads, tuple) and len(grads) == 2
  assert grads[1].shape == x.shape
  _assert_close(grads, ref, 2e-4)
  _assert_close(new_state, ref_state, 2e-4)


def test_mixed_gram_routes():
  rng = np.random.default_rng(0)
  params, x, y = _data(3, rng, jnp.float32)
  cov = gj.gram_coverage(mlp_losses)(params, x, y)
  assert cov["['w1']"] == "dense"
  assert cov["['w2']"] != "dense" and cov["['b1']"] != "dense"


def test_inject_hyperparams():
  """Through optax.inject_hyperparams, with a hyperparameter changed in the
  state (the lean step must read it)."""
  t = 4
  method = gj.inject_hyperparams(gj.gradcraft)(tau=0.5, eps=0.1, num_tasks=t)
  rng = np.random.default_rng(3)
  params, x, y = _data(t, rng, jnp.float32)
  state = method.init(params)
  state.hyperparams["tau"] = jnp.asarray(0.9, jnp.float32)
  lean = gj.combined_value_and_grad(mlp_losses, method)

  @jax.jit
  def both(params, state, x, y):
    ref_losses, g = gj.per_task_value_and_grad(mlp_losses)(params, x, y)
    return lean(params, state, x, y), method.update(g, state, params, task_losses=ref_losses)

  (_, grads, new_state), (ref, ref_state) = both(params, state, x, y)
  _assert_close(grads, ref, 2e-4)
  _assert_close(new_state, ref_state, 2e-4)


def test_not_a_method():
  with pytest.raises(TypeError, match="combined_value_and_grad"):
    gj.combined_value_and_grad(mlp_losses, optax.adam(1e-3))


def test_losses_must_be_a_vector():
  step = gj.combined_value_and_grad(lambda p: jnp.sum(p), gj.mgda())
  with pytest.raises(ValueError, match="1-D vector"):
    step(jnp.ones(3), optax.EmptyState())


def _temp_bytes(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_below_stacked():
  """Deep MLP with leaves of equal size: the stacked path holds T copies of
  all parameters, the lean step only those of a leaf or two at a time."""
  t, width, depth, batch = 8, 128, 6, 16
  rng = np.random.default_rng(4)
  params = [
    jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32) for _ in range(depth)
  ]
  x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)

  def fun(ps, x):
    h = x
    for w in ps:
      h = jnp.tanh(h @ w)
    return jnp.mean(h[:, :t] ** 2, axis=0)

  method = gj.upgrad()
  state = method.init(params)
  lean = jax.jit(gj.combined_value_and_grad(fun, method))

  def stacked(ps, s, x):
    losses, g = gj.per_task_value_and_grad(fun)(ps, x)
    return method.update(g, s, ps, task_losses=losses)

  lean_bytes = _temp_bytes(lean, params, state, x)
  stacked_bytes = _temp_bytes(jax.jit(stacked), params, state, x)
  stacked_grads = t * depth * width * width * 4
  assert stacked_bytes >= stacked_grads
  assert lean_bytes < 0.5 * stacked_bytes, (lean_bytes, stacked_bytes)
  # Loss-only methods: no Gram pass, memory of a plain backward pass.
  mean_step = jax.jit(gj.combined_value_and_grad(fun, gj.mean()))
  assert _temp_bytes(mean_step, params, optax.EmptyState(), x) < lean_bytes


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_gram_equals_stacked(chunk_size):
  """chunk_size: Gram rows from JVPs along each chunk's gradients."""
  t = 5
  rng = np.random.default_rng(5)
  params, x, y = _data(t, rng, jnp.float32)
  for method in (gj.gradcraft(0.5, 0.1), gj.upgrad(), gj.mean()):
    state = method.init(params)
    lean = gj.combined_value_and_grad(mlp_losses_aux, method, has_aux=True, chunk_size=chunk_size)

    @jax.jit
    def both(params, state, x, y, lean=lean, method=method):
      (ref_losses, _), g = gj.per_task_value_and_grad(mlp_losses_aux, has_aux=True)(params, x, y)
      return lean(params, state, x, y), method.update(g, state, params, task_losses=ref_losses)

    (_, grads, new_state), (ref, ref_state) = both(params, state, x, y)
    _assert_close(grads, ref, 2e-4)
    _assert_close(new_state, ref_state, 2e-4)


def test_chunked_gram_bounds_backward_memory():
  """Few parameters, wide activations: the batched backward pass (T
  cotangents of every activation) dominates, and chunk_size bounds it."""
  t, batch, width = 16, 256, 64
  rng = np.random.default_rng(6)
  params = {
    "w1": jnp.asarray(rng.normal(size=(8, width)) / 3, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(width, t)) / 8, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)

  def fun(p, x):
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean(jnp.tanh(h @ p["w2"]) ** 2, axis=0)

  method = gj.mgda()
  state = method.init(params)
  full = jax.jit(gj.combined_value_and_grad(fun, method))
  chunked = jax.jit(gj.combined_value_and_grad(fun, method, chunk_size=2))
  assert _temp_bytes(chunked, params, state, x) < 0.5 * _temp_bytes(full, params, state, x)
  _assert_close(chunked(params, state, x)[1], full(params, state, x)[1], 2e-4)
