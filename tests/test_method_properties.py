"""Properties every multi-task method shares, over all methods.

In the style of torchjd's aggregator property tests: structure, dtypes and
finiteness on normal, rank-deficient, all-zero and extreme-scale inputs;
permutation equivariance for order-free methods; the non-conflict guarantee
where claimed; jit without retracing; input validation; use inside
``optax.chain``; propagation of non-finite inputs.
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

CASE = {c.name: c for c in CASES}
ORDER_FREE = [c for c in CASES if c.order_free]
# Methods whose fixed-iteration float32 solver has a documented accuracy
# coarser than the default tolerances (see the method's docstring): CAGrad's
# barrier method is accurate to ~1e-3 relative when the support of its
# simplex weights is not identified exactly.
SOLVER_TOL = {"cagrad": 5e-3}
NONCONFLICTING = [c for c in CASES if c.nonconflicting]
WITH_LOSSES = [c for c in CASES if c.needs_losses]

SHAPES = {"a": (3, 4), "b": (5,)}
D = 17


def make_stacked(flat, dtype=jnp.float32):
  """(T, 17) array -> stacked pytree {"a": (T, 3, 4), "b": (T, 5)}."""
  flat = np.asarray(flat)
  t = flat.shape[0]
  return {
    "a": jnp.asarray(flat[:, :12].reshape(t, 3, 4), dtype),
    "b": jnp.asarray(flat[:, 12:], dtype),
  }


def flatten(tree):
  return np.concatenate(
    [np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"], np.float64).ravel()]
  )


def gradients(kind, t, rng):
  if kind == "normal":
    return rng.standard_normal((t, D))
  if kind == "duplicate":  # tasks 0 and 1 identical, the rest rank <= 2
    basis = rng.standard_normal((2, D))
    g = rng.standard_normal((t, 2)) @ basis
    g[1] = g[0]
    return g
  if kind == "opposite":
    g = rng.standard_normal((t, D))
    g[1] = -g[0]
    return g
  if kind == "zeros":
    return np.zeros((t, D))
  if kind == "one_zero":
    g = rng.standard_normal((t, D))
    g[0] = 0.0
    return g
  raise ValueError(kind)


def params_like(dtype=jnp.float32):
  return {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}


def extra_args(case, t, perm=None):
  """``case.extra(t, rng)`` (e.g. a second batch's cross Gram matrix) from a
  fixed seed, or ``{}``; with ``perm``, every axis of length ``T`` of each
  array is permuted like the tasks."""
  if case.extra is None:
    return {}
  extra = case.extra(t, np.random.default_rng(7))
  if perm is not None:
    for k, v in extra.items():
      v = np.asarray(v)
      for axis, n in enumerate(v.shape):
        if n == t:
          v = np.take(v, perm, axis=axis)
      extra[k] = v
  return extra


@functools.lru_cache(maxsize=None)
def transform(name, t):
  """``(tx, jitted tx.update)`` of a method for ``T`` tasks, built once per
  test process: the tests of this file share the compiled updates (one
  compile per method, task count and dtype)."""
  tx = CASE[name].make(t)
  return tx, jax.jit(tx.update)


def run_steps(case, flats, losses, dtype=jnp.float32, jit=True, perm=None):
  """Runs one transform over a sequence of (T, D) gradients; returns the
  updates and the final state. ``perm``: the tasks were permuted (the extra
  arguments are permuted alike)."""
  needs_losses = case.needs_losses
  t = flats[0].shape[0]
  tx, jitted = transform(case.name, t)
  state = tx.init(params_like(dtype))
  update = jitted if jit else tx.update
  outs = []
  for flat, loss in zip(flats, losses):
    kw = {"task_losses": jnp.asarray(loss, jnp.float32)} if needs_losses else {}
    kw.update(extra_args(case, t, perm))
    upd, state = update(make_stacked(flat, dtype), state, params_like(dtype), **kw)
    outs.append(upd)
  return outs, state


def tree_signature(tree):
  return jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def all_finite(tree):
  return all(
    bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree_util.tree_leaves(tree)
  )


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
  "kind,dtype",
  [
    ("normal", jnp.float32),
    ("duplicate", jnp.float32),
    ("opposite", jnp.float32),
    ("zeros", jnp.float32),
    ("one_zero", jnp.float32),
    ("normal", jnp.bfloat16),
    ("duplicate", jnp.bfloat16),
  ],
)
def test_structure_dtype_finite(case, kind, dtype):
  rng = np.random.default_rng(0)
  t = 4
  flats = [gradients(kind, t, rng) for _ in range(3)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(3)]
  factory = case.make
  tx = factory(t)
  state0 = tx.init(params_like(dtype))
  outs, state = run_steps(case, flats, losses, dtype)
  assert tree_signature(state) == tree_signature(state0)
  for upd in outs:
    assert tree_signature(upd) == tree_signature(params_like(dtype))
    assert all_finite(upd), (kind, upd)
  if kind == "zeros":
    for upd in outs:
      assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(upd))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1e-10, 1e-4, 1e4, 1e10])
def test_extreme_scales_float32(case, scale):
  rng = np.random.default_rng(1)
  t = 3
  flats = [scale * gradients("normal", t, rng) for _ in range(3)]
  losses = [scale * rng.uniform(0.5, 2.0, t) for _ in range(3)]
  outs, state = run_steps(case, flats, losses)
  for upd in outs:
    assert all_finite(upd), (scale, upd)
  assert all_finite(state)


@pytest.mark.slow
@pytest.mark.parametrize("case", ORDER_FREE, ids=[c.name for c in ORDER_FREE])
@settings(deadline=None, max_examples=4)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 5))
def test_permutation_equivariance(case, seed, t):
  rng = np.random.default_rng(seed)
  perm = rng.permutation(t)
  flats = [gradients("normal", t, rng) * rng.uniform(0.2, 5.0, (t, 1)) for _ in range(3)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(3)]
  outs, _ = run_steps(case, flats, losses)
  outs_p, _ = run_steps(case, [f[perm] for f in flats], [l[perm] for l in losses], perm=perm)
  tol = SOLVER_TOL.get(case.name, 1e-5)
  for u, up, f in zip(outs, outs_p, flats):
    scale = np.abs(f).max() * t
    np.testing.assert_allclose(flatten(up), flatten(u), rtol=10 * tol, atol=tol * scale)


@pytest.mark.slow
@pytest.mark.parametrize("case", NONCONFLICTING, ids=[c.name for c in NONCONFLICTING])
@settings(deadline=None, max_examples=8)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(2, 6),
  kind=st.sampled_from(["normal", "duplicate", "opposite", "one_zero"]),
)
def test_nonconflicting(case, seed, t, kind):
  rng = np.random.default_rng(seed)
  flats = [gradients(kind, t, rng) * rng.uniform(0.1, 10.0, (t, 1)) for _ in range(2)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(2)]
  outs, _ = run_steps(case, flats, losses)
  for u, f in zip(outs, flats):
    u = flatten(u)
    inner = f @ u
    # rounding and solver error scale with the inputs, not with the update
    norms = np.linalg.norm(f, axis=1)
    tol = 1e-3 * norms * norms.max()
    assert np.all(inner >= -tol), inner


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_does_not_retrace(case):
  name, factory, needs_losses = case.name, case.make, case.needs_losses
  t = 3
  tx = factory(t)
  traces = []

  def step(g, state, losses):
    traces.append(1)
    kw = {"task_losses": losses} if needs_losses else {}
    return tx.update(g, state, None, **kw, **extra_args(case, t))

  jstep = jax.jit(step)
  rng = np.random.default_rng(2)
  state = tx.init(params_like())
  for _ in range(3):
    _, state = jstep(
      make_stacked(rng.standard_normal((t, D))),
      state,
      jnp.asarray(rng.uniform(0.5, 2.0, t), jnp.float32),
    )
  assert len(traces) == 1, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_task_count_mismatch_raises(case):
  factory, needs_losses = case.make, case.needs_losses
  tx = factory(3)
  state = tx.init(params_like())
  kw = {"task_losses": jnp.ones(4)} if needs_losses else {}
  with pytest.raises(ValueError, match="num_tasks|tasks"):
    tx.update(make_stacked(np.ones((4, D))), state, **kw)


@pytest.mark.parametrize("case", WITH_LOSSES, ids=[c.name for c in WITH_LOSSES])
def test_missing_or_misshaped_losses_raise(case):
  _, factory, _ = case.name, case.make, case.needs_losses
  tx = factory(3)
  state = tx.init(params_like())
  g = make_stacked(np.ones((3, D)))
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(g, state)
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(g, state, task_losses=jnp.ones(2))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_with_adam(case):
  """Trains a toy 3-task least-squares problem with chain(method, adam)."""
  _, factory, needs_losses = case.name, case.make, case.needs_losses
  rng = np.random.default_rng(3)
  t = 3
  a = jnp.asarray(rng.standard_normal((t, 6, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((t, 6)), jnp.float32)

  def losses_fn(params):
    pred = jnp.einsum("tij,j->ti", a, params["w"]) + params["c"]
    return 0.5 * jnp.mean((pred - b) ** 2, axis=1)

  tx = optax.chain(factory(t), optax.adam(1e-2))
  params = {"w": jnp.zeros(4), "c": jnp.zeros(())}
  state = tx.init(params)
  vg = gj.per_task_value_and_grad(losses_fn)

  @jax.jit
  def step(params, state):
    losses, grads = vg(params)
    kw = {"task_losses": losses} if needs_losses else {}
    upd, state = tx.update(grads, state, params, **kw, **extra_args(case, t))
    return optax.apply_updates(params, upd), state, losses

  first = None
  for _ in range(20):
    params, state, losses = step(params, state)
    first = losses if first is None else first
  assert all_finite(params) and all_finite(state)
  assert tree_signature(params) == tree_signature({"w": jnp.zeros(4), "c": jnp.zeros(())})
  assert not np.allclose(np.asarray(params["w"]), 0.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_input_gives_nonfinite_output(case, bad):
  rng = np.random.default_rng(4)
  flat = rng.standard_normal((3, D))
  flat[1, 2] = bad
  outs, _ = run_steps(case, [flat], [rng.uniform(0.5, 2.0, 3)])
  assert not all_finite(outs[0])
