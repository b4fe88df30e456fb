"""The compatibility matrix: every method x every optax / Flax / Orbax placement.

One test per (placement, method), parametrised over ``method_cases.CASES`` so
new methods are covered automatically. ``scripts/compat_matrix.py`` runs this
file and writes ``docs/compatibility.md`` from the outcomes.

Every cell trains the same tiny two-task model (a shared ``bottom`` layer and
one ``towers/t<i>`` head per task) for a few steps with
``optax.chain(method, optax.adam(LR))`` inside the placement, and compares
with the plain chain (the baseline cell) run on the same batches; compiled
steps are cached per (placement, method) so each is compiled once (the
fault-injection tests reuse the ``apply_if_finite`` step). The cells that
only restate another cell's mechanism with a further wrapper
(``inject_hyperparams``, ``optax.apply_if_finite`` inside, ``shared_only``,
``partition``, ``masked``, ``nnx.Optimizer``, donation) are marked slow: one compile each per
method.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_cases import CASES, IDS

import gradcraft_jax as gj

T = 3  # some methods need three tasks (Krum)
D_IN, H = 3, 4
BATCH = 16
LR = 0.05
CASE = {c.name: c for c in CASES}
# Methods with iterative solvers: float32 round-off of the mean of two
# micro-batch gradients vs the large batch's gradient moves their answer by
# more than the default tolerance.
ACCUM_TOL = {"cagrad": 2e-3, "nash_mtl": 2e-3, "mgda": 1e-3, "upgrad": 1e-3, "cr_mogm": 1e-3}

# The placements (columns of the docs matrix), in order:
# test function name -> (column title, what a pass means, how to use it)
CELLS = {
  "test_chain": ("optax.chain", "works", "`optax.chain(method, optimizer)`"),
  "test_inject_hyperparams": (
    "inject_hyperparams",
    "works",
    "`optax.inject_hyperparams(factory, static_args=...)` around the method",
  ),
  "test_apply_if_finite_library_outside": (
    "apply_if_finite (library, outside)",
    "works",
    "`gradcraft_jax.apply_if_finite(optax.chain(method, opt), n)`",
  ),
  "test_apply_if_finite_optax_inside": (
    "optax.apply_if_finite (inside)",
    "works",
    "`optax.chain(method, optax.apply_if_finite(opt, n))`",
  ),
  "test_apply_if_finite_optax_outside": (
    "optax.apply_if_finite (outside)",
    "fails",
    "fails (zeros shaped like the stacked input): use `gradcraft_jax.apply_if_finite`",
  ),
  "test_accumulation_library": (
    "MultiSteps (library)",
    "works",
    "`gradcraft_jax.MultiSteps(optax.chain(method, opt), k, num_tasks=T)`",
  ),
  "test_accumulation_optax_outside": (
    "optax.MultiSteps (outside)",
    "fails",
    "fails with a message pointing to `gradcraft_jax.MultiSteps`",
  ),
  "test_shared_only": (
    "shared_only",
    "works",
    "`gradcraft_jax.shared_only(method, mask)` (task-specific leaves: `task_sum`)",
  ),
  "test_partition": (
    "optax.partition",
    "works",
    '`optax.partition({"shared": method, "task": gradcraft_jax.task_sum()}, labels)`',
  ),
  "test_masked": (
    "optax.masked",
    "works",
    "`optax.masked(method, mask)` (+ `optax.masked(task_sum(), ~mask)`); empty groups pass",
  ),
  "test_nnx_optimizer": (
    "flax.nnx.Optimizer",
    "works",
    "`nnx.Optimizer(model, chain, wrt=nnx.Param).update(model, grads, task_losses=...)`",
  ),
  "test_orbax_restore": (
    "Orbax save/restore",
    "works",
    "`ocp.StandardCheckpointer` mid-training; continues bit-identically",
  ),
  "test_jit_donated": (
    "jit, donated buffers",
    "works",
    "`jax.jit(step, donate_argnums=(0, 1))`; bit-identical to no donation",
  ),
}

# ---------------------------------------------------------------- the problem


def init_params(seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return {
    "bottom": {"w": jnp.asarray(scale * rng.standard_normal((D_IN, H)), jnp.float32)},
    "towers": {f"t{i}": jnp.asarray(scale * rng.standard_normal(H), jnp.float32) for i in range(T)},
  }


TEACHER = init_params(seed=100, scale=1.0)


def task_losses_fn(params, x, y):
  """``(T,)`` mean squared errors of the towers on a shared tanh layer."""
  h = jnp.tanh(x @ params["bottom"]["w"])
  preds = jnp.stack([h @ params["towers"][f"t{i}"] for i in range(T)], axis=1)
  return jnp.mean((preds - y) ** 2, axis=0)


def make_batch(rng, n=BATCH):
  x = rng.standard_normal((n, D_IN)).astype(np.float32)
  h = np.tanh(x @ np.asarray(TEACHER["bottom"]["w"]))
  y = np.stack([h @ np.asarray(TEACHER["towers"][f"t{i}"]) for i in range(T)], axis=1)
  y = y + 0.05 * rng.standard_normal(y.shape)
  return jnp.asarray(x), jnp.asarray(y, jnp.float32)


_grads = jax.jit(gj.per_task_value_and_grad(task_losses_fn))


def grads_of(params, batch):
  """``(losses, stacked grads)`` of one batch."""
  return _grads(params, *batch)


@functools.lru_cache(maxsize=None)
def batches(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(make_batch(rng) for _ in range(n))


def poisoned(grads, losses, bad=jnp.nan):
  """NaN (or ``bad``) in one gradient entry and one loss."""
  g = jax.tree_util.tree_map(lambda x: x, grads)
  g["bottom"]["w"] = g["bottom"]["w"].at[0, 1, 2].set(bad)
  return g, losses.at[1].set(bad)


def extra_args(case):
  """(static, dynamic) extra update arguments of a case."""
  if case.extra is None:
    return {}, {}
  ex = case.extra(T, np.random.default_rng(0))
  dyn = {k: v for k, v in ex.items() if isinstance(v, (jax.Array, np.ndarray))}
  static = {k: v for k, v in ex.items() if k not in dyn}
  return static, dyn


def _make_step(tx, case, donate=False):
  static, _ = extra_args(case)

  def step(params, state, grads, losses, dyn):
    updates, state = tx.update(grads, state, params, task_losses=losses, **static, **dyn)
    return optax.apply_updates(params, updates), state, updates

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def build(cell, name):
  """The transform of a placement for one method."""
  case = CASE[name]
  method = lambda: case.make(T)
  opt = lambda: optax.adam(LR)
  shared = lambda p: gj.label_by_path(p, "bottom")
  if cell in ("chain", "donated"):
    return optax.chain(method(), opt())
  if cell == "inject":
    inject_method = optax.inject_hyperparams(case.make, static_args=("t",))(T)
    return optax.chain(inject_method, optax.inject_hyperparams(optax.adam)(learning_rate=LR))
  if cell == "aif_library":
    return gj.apply_if_finite(optax.chain(method(), opt()), 2)
  if cell == "aif_inside":
    return optax.chain(method(), optax.apply_if_finite(opt(), 2))
  if cell == "accumulation":
    return gj.MultiSteps(optax.chain(method(), opt()), 2, num_tasks=T)
  if cell == "shared_only":
    return optax.chain(gj.shared_only(method(), shared), opt())
  if cell == "partition":
    labels = gj.label_by_path(init_params(), "bottom", labels=("shared", "task"))
    return optax.chain(optax.partition({"shared": method(), "task": gj.task_sum()}, labels), opt())
  if cell == "masked":
    mask = shared(init_params())
    inverse = jax.tree_util.tree_map(lambda m: not m, mask)
    return optax.chain(optax.masked(method(), mask), optax.masked(gj.task_sum(), inverse), opt())
  raise ValueError(cell)


@functools.lru_cache(maxsize=None)
def compiled(cell, name):
  """``(tx, step)`` for a placement, compiled once per (cell, method)."""
  tx = build(cell, name)
  return tx, _make_step(tx, CASE[name], donate=cell == "donated")


def run(cell, name, batch_ids, *, bad=(), params=None, state=None):
  """Runs the cell's step over ``batch_ids`` (steps listed in ``bad`` get a
  NaN gradient entry and a NaN loss); returns (params, state, updates list)."""
  tx, step = compiled(cell, name)
  _, dyn = extra_args(CASE[name])
  params = init_params() if params is None else params
  state = tx.init(params) if state is None else state
  history = []
  for i, b in enumerate(batch_ids):
    losses, grads = grads_of(params, batches()[b])
    if i in bad:
      grads, losses = poisoned(grads, losses)
    params, state, updates = step(params, state, grads, losses, dyn)
    history.append(updates)
  return params, state, history


def assert_finite(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
      assert np.all(np.isfinite(np.asarray(leaf)))


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
    a,
    b,
  )


def assert_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b
  )


@functools.lru_cache(maxsize=None)
def reads_what_was_poisoned(name):
  """Whether the method's weights read the Gram matrix or the losses (then
  a non-finite batch keeps its state); probed with a NaN Gram matrix and NaN
  losses. Methods that read neither (RLW: random weights), and methods that
  are not Gram weightings (GradDrop), may advance their state on any batch
  (the state stays finite)."""
  case = CASE[name]
  tx = case.make(T)
  static, dyn = extra_args(case)
  nan = jnp.full((T, T), jnp.nan)
  try:
    w, _ = gj.task_weights(
      tx, None, tx.init(init_params()), gram=nan, task_losses=jnp.full(T, jnp.nan), **static, **dyn
    )
  except TypeError:  # not a weighting of the Gram matrix (e.g. GradDrop)
    return False
  return not bool(np.all(np.isfinite(np.asarray(w))))


def same_tree(a, b):
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


def zero_tree(tree):
  return all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(tree))


params_shape = jax.tree_util.tree_structure(init_params())
ALL = pytest.mark.parametrize("name", IDS)


# ------------------------------------------------------------------ the cells


@ALL
def test_chain(name):
  params, state, history = run("chain", name, [0, 1])
  assert_finite((params, state, history))
  for upd in history:
    assert jax.tree_util.tree_structure(upd) == params_shape
    chex_shapes = jax.tree_util.tree_map(jnp.shape, upd)
    assert chex_shapes == jax.tree_util.tree_map(jnp.shape, init_params())
  assert not zero_tree(history[0])


@pytest.mark.slow
@ALL
def test_inject_hyperparams(name):
  params, _, history = run("inject", name, [0, 1])
  ref_params, _, ref_history = run("chain", name, [0, 1])
  assert_close(history, ref_history)
  assert_close(params, ref_params)


@ALL
def test_apply_if_finite_library_outside(name):
  # step 1 is poisoned: skipped (zeros), every state kept, then training goes
  # on exactly as if that batch had never come
  _, state0, _ = run("aif_library", name, [0])
  params, state, history = run("aif_library", name, [0, 1, 2], bad=(1,))
  assert zero_tree(history[1])
  assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 0
  assert bool(state.last_finite)
  ref_params, ref_state, ref_history = run("chain", name, [0, 2])
  assert_close(history[2], ref_history[1])
  assert_close(params, ref_params)
  assert_close(state.inner_state, ref_state)
  # the bad step alone keeps every state bit for bit
  _, state1, _ = run("aif_library", name, [0, 1], bad=(1,))
  assert_equal(state1.inner_state, state0.inner_state)
  assert int(state1.notfinite_count) == 1 and not bool(state1.last_finite)


@pytest.mark.slow
@ALL
def test_apply_if_finite_optax_inside(name):
  # optax.apply_if_finite after the method: the method makes a non-finite
  # update and keeps its own state; optax's wrapper skips the step
  _, state0, _ = run("aif_inside", name, [0])
  params, state1, history = run("aif_inside", name, [0, 1], bad=(1,))
  assert zero_tree(history[1])
  assert int(state1[1].notfinite_count) == 1
  assert_finite(state1[0])
  if not same_tree(state1[0], state0[0]):
    # the method's state is kept, unless it reads neither the gradients'
    # Gram matrix nor the losses (e.g. RLW's random weights): then its state
    # advanced (finite) and the run continues from there
    assert not reads_what_was_poisoned(name)
    return
  assert_equal(state1[1].inner_state, state0[1].inner_state)
  params, _, history = run("aif_inside", name, [0, 1, 2], bad=(1,))
  ref_params, _, ref_history = run("chain", name, [0, 2])
  assert_close(history[2], ref_history[1])
  assert_close(params, ref_params)


@ALL
def test_apply_if_finite_optax_outside(name):
  # optax's wrapper returns zeros shaped like its (stacked) input: cannot
  # work around a chain that starts with a method (use the library's)
  tx = optax.apply_if_finite(optax.chain(CASE[name].make(T), optax.adam(LR)), 2)
  params = init_params()
  losses, grads = grads_of(params, batches()[0])
  static, dyn = extra_args(CASE[name])
  with pytest.raises((TypeError, ValueError)):
    tx.update(grads, tx.init(params), params, task_losses=losses, **static, **dyn)


def test_accumulation_micro_batches_are_the_large_batch():
  # the gradient of the mean loss over a batch is the mean of the gradients
  # of its equal halves: the property the accumulation tests rely on
  params = init_params()
  x, y = batches()[0]
  losses, grads = grads_of(params, (x, y))
  halves = [grads_of(params, (x[i::2], y[i::2])) for i in range(2)]
  assert_close(losses, (halves[0][0] + halves[1][0]) / 2)
  assert_close(grads, jax.tree_util.tree_map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1]))


@ALL
def test_accumulation_library(name):
  # k = 2 micro-batches (the two halves of each batch) == one large batch
  tx, step = compiled("accumulation", name)
  _, dyn = extra_args(CASE[name])
  params = init_params()
  state = tx.init(params)
  history = []
  for b in (0, 1):
    x, y = batches()[b]
    for i in range(2):
      losses, grads = grads_of(params, (x[i::2], y[i::2]))
      params, state, updates = step(params, state, grads, losses, dyn)
      history.append(updates)
      assert bool(tx.has_updated(state)) == (i == 1)
  assert zero_tree(history[0]) and zero_tree(history[2])
  ref_params, ref_state, ref_history = run("chain", name, [0, 1])
  tol = ACCUM_TOL.get(name, 2e-5)
  assert_close(history[1], ref_history[0], rtol=tol, atol=tol * 1e-2)
  assert_close(history[3], ref_history[1], rtol=tol, atol=tol * 1e-2)
  assert_close(params, ref_params, rtol=tol, atol=tol * 1e-2)
  assert_close(state.inner_opt_state, ref_state, rtol=tol, atol=tol * 1e-2)
  assert int(state.gradient_step) == 2


@ALL
def test_accumulation_optax_outside(name):
  # optax.MultiSteps calls the chain on parameter-shaped accumulators
  tx = optax.MultiSteps(optax.chain(CASE[name].make(T), optax.adam(LR)), 2)
  params = init_params()
  losses, grads = grads_of(params, batches()[0])
  static, dyn = extra_args(CASE[name])
  with pytest.raises(ValueError, match="gradcraft_jax.MultiSteps"):
    tx.update(grads, tx.init(params), params, task_losses=losses, **static, **dyn)


@pytest.mark.slow
@ALL
def test_shared_only(name):
  params, state, history = run("shared_only", name, [0, 1])
  assert_finite((params, state, history))
  # towers are trained with their own task's gradient (through adam): the
  # first adam step is -lr * sign(g) for every nonzero entry
  _, grads = grads_of(init_params(), batches()[0])
  for i in range(T):
    g = np.asarray(grads["towers"][f"t{i}"][i])
    np.testing.assert_allclose(history[0]["towers"][f"t{i}"], -LR * np.sign(g), rtol=1e-4)


@pytest.mark.slow
@ALL
def test_partition(name):
  params, _, history = run("partition", name, [0, 1])
  ref_params, _, ref_history = run("shared_only", name, [0, 1])
  assert_close(history, ref_history)
  assert_close(params, ref_params)


@pytest.mark.slow
@ALL
def test_masked(name):
  params, _, history = run("masked", name, [0, 1])
  ref_params, _, ref_history = run("shared_only", name, [0, 1])
  assert_close(history, ref_history)
  assert_close(params, ref_params)
  # an empty group passes through unchanged
  none = jax.tree_util.tree_map(lambda _: False, init_params())
  tx = optax.masked(CASE[name].make(T), none)
  losses, grads = grads_of(init_params(), batches()[0])
  state = tx.init(init_params())
  out, new_state = tx.update(grads, state, init_params(), task_losses=losses)
  assert_equal(out, grads)
  assert_equal(new_state, state)


@functools.lru_cache(maxsize=None)
def _nnx_step(name):
  from flax import nnx

  case = CASE[name]
  static, _ = extra_args(case)

  @nnx.jit
  def step(model, optimizer, grads, losses, dyn):
    optimizer.update(model, grads, task_losses=losses, **static, **dyn)

  return step


@pytest.mark.slow
@ALL
def test_nnx_optimizer(name):
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, params):
      self.bottom = nnx.Dict(w=nnx.Param(params["bottom"]["w"]))
      self.towers = nnx.Dict({k: nnx.Param(v) for k, v in params["towers"].items()})

  model = Model(init_params())
  optimizer = nnx.Optimizer(model, optax.chain(CASE[name].make(T), optax.adam(LR)), wrt=nnx.Param)
  graphdef, _ = nnx.split(model, nnx.Param)
  step = _nnx_step(name)
  _, dyn = extra_args(CASE[name])

  def as_dict(state):
    pure = nnx.to_pure_dict(state)
    return {"bottom": {"w": pure["bottom"]["w"]}, "towers": dict(pure["towers"])}

  for b in (0, 1):
    state = nnx.state(model, nnx.Param)
    losses, grads = grads_of(as_dict(state), batches()[b])
    grad_state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(grad_state, grads)
    step(model, optimizer, grad_state, losses, dyn)
  ref_params, _, _ = run("chain", name, [0, 1])
  assert_close(as_dict(nnx.state(model, nnx.Param)), ref_params)
  del graphdef


@ALL
def test_orbax_restore(name, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  # the uninterrupted run: 4 steps, one of them bad
  full_params, full_state, _ = run("aif_library", name, [0, 1, 2, 3], bad=(1,))
  params, state, _ = run("aif_library", name, [0, 1], bad=(1,))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    abstract = jax.tree_util.tree_map(
      ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}
    )
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  assert_equal(restored["opt_state"], state)
  params, state, _ = run(
    "aif_library", name, [2, 3], params=restored["params"], state=restored["opt_state"]
  )
  assert_equal(params, full_params)
  assert_equal(state, full_state)


@pytest.mark.slow
@ALL
def test_jit_donated(name):
  params, state, history = run("donated", name, [0, 1, 2])
  ref_params, ref_state, ref_history = run("chain", name, [0, 1, 2])
  assert_equal(params, ref_params)
  assert_equal(state, ref_state)
  assert_equal(history, ref_history)
