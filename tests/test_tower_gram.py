"""Per-task towers, stacked towers, gates and experts in the lean step.

A parameter (or a slice of one along a task axis) that reaches one task
loss only has a diagonal Gram block, and its gradient comes from one
pullback of the all-ones cotangent through the head; the batched pullback
of the ``T`` one-hot cotangents covers the shared trunk alone. The
reference is ``jax.jacrev``'s stacked path (``lean_route_models.py``), and
the cost is checked from the compiled step's flop count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lean_route_models import (
  CASE,
  T,
  assert_matches,
  coverage,
  embedding_model,
  mmoe_model,
  ple_model,
  ranking_model,
  stacked_tower_model,
  tower_model,
)
from method_cases import CASES

import gradcraft_jax as gj

MODELS = {
  "towers": tower_model,
  "stacked_towers": stacked_tower_model,
  "mmoe": mmoe_model,
  "ple": ple_model,
  "ranking": ranking_model,
}


def test_coverage_names_the_routes():
  fun, params, args = tower_model(jnp.float32)
  cov = coverage(fun, params, args)
  assert {cov[f"['towers'][{t}]['{k}']"] for t in range(T) for k in "wbo"} == {"task-local (tower)"}
  assert cov["['emb']"] == "embedding"
  fun, params, args = stacked_tower_model(jnp.float32)
  cov = coverage(fun, params, args)
  for k in ("tw", "tb", "to", "vw", "head"):  # einsum, jax.vmap, a (H, T) head
    assert cov[f"['{k}']"] == "task-local (per-task slices)", k
  fun, params, args = mmoe_model(jnp.float32)
  cov = coverage(fun, params, args)
  assert cov["['gate']"] == cov["['tw']"] == "task-local (per-task slices)"
  cov = coverage(fun, params, args, gram="dense")
  assert cov["['ex2']"] == "dense (batched)"  # einsum('ebh,ehk->ebk')
  assert cov["['ex1']"] == "dense"  # einsum('bd,edh->ebh'): no batch dimension
  fun, params, args = ple_model(jnp.float32)
  cov = coverage(fun, params, args)
  # task experts: slices 2t, 2t+1 of the leading axis are task t's (a reshape)
  assert cov["['task_ex']"] == cov["['gates']"] == "task-local (per-task slices)"
  assert {cov[f"['towers'][{t}]"] for t in range(T)} == {"task-local (tower)"}
  assert not cov["['shared_ex']"].startswith("task-local")


@pytest.mark.parametrize(
  "model, dtype",
  [(m, "float32") for m in MODELS]
  + [
    (m, "float64") if m == "ranking" else pytest.param(m, "float64", marks=pytest.mark.slow)
    for m in MODELS
  ],
)
def test_equals_stacked(model, dtype):
  with jax.enable_x64(dtype == "float64"):
    assert_matches(MODELS[model], dtype, steps=2)


@pytest.mark.parametrize("model", ["mmoe", pytest.param("stacked_towers", marks=pytest.mark.slow)])
def test_gram_dense_mode(model):
  """gram="dense": the identity wherever it applies (batched products of
  the experts, task-local leaves included)."""
  assert_matches(MODELS[model], "float32", gram="dense")


@pytest.mark.parametrize("model", ["towers", "mmoe"])
def test_has_aux_and_argnums(model):
  """Aux values from trunk and head, and the labels differentiated as a
  second argument (a trunk-free input of the head)."""
  assert_matches(MODELS[model], "float32", has_aux=True)

  def build(dtype):
    fun, params, args = MODELS[model](dtype)
    *rest, y = args
    return (lambda p, y, *rest: fun(p, *rest, y)), params, (y, *rest)

  assert_matches(build, "float32", argnums=(0, 1), has_aux=True)


def _shared_model(dtype):
  """What stays shared: a tower read by two tasks, a softmax across the
  tasks' logits, a shared per-example bias broadcast over the tasks and a
  shared scalar temperature (both read by the head, their cotangents split
  by task there), next to a task-local tower."""
  k = jax.random.split(jax.random.PRNGKey(6), 8)
  p = {
    "bottom": jax.random.normal(k[0], (4, 5), dtype) / 2,
    "pair": jax.random.normal(k[1], (5, 3), dtype) / 2,  # tasks 0 and 1
    "solo": jax.random.normal(k[2], (5, 3), dtype) / 2,  # task 2
    "mix": jax.random.normal(k[3], (T, T), dtype) / 2,
    "bias": jax.random.normal(k[4], (5,), dtype) / 2,
    "temp": jnp.asarray(1.3, dtype),
  }
  x = jax.random.normal(k[5], (6, 4), dtype)

  def fun(p, x):
    z = jnp.tanh(x @ p["bottom"])
    a = jnp.sum(jnp.tanh(z @ p["pair"]), -1)
    b = jnp.sum(jnp.tanh(z @ p["solo"]), -1)
    logits = jnp.stack([a, 2 * a, b], 1) * p["temp"] + (z @ p["bias"])[:, None]
    mixed = jax.nn.softmax(logits @ p["mix"], axis=-1)  # couples the tasks
    return jnp.mean(logits**2, 0) + 0.1 * jnp.mean(mixed, 0)

  return fun, p, (x,)


def test_shared_parameters_stay_shared():
  fun, params, args = _shared_model(jnp.float32)
  cov = coverage(fun, params, args)
  for k in ("pair", "mix", "bias", "temp", "bottom"):
    assert not cov[f"['{k}']"].startswith("task-local"), k
  assert_matches(_shared_model, "float32")


def _head_sites_model(dtype):
  """Task-local towers whose head reads trunk values through a size-1
  broadcast (a per-example bias added to every task's logit), a scalar
  leaf (a shared temperature) and a broadcast_in_dim adding the task axis."""
  k = jax.random.split(jax.random.PRNGKey(7), 6)
  p = {
    "bottom": jax.random.normal(k[0], (4, 5), dtype) / 2,
    "bias": jax.random.normal(k[1], (5,), dtype) / 2,
    "temp": jnp.asarray(0.7, dtype),
    "scale": jax.random.normal(k[2], (T, 5), dtype) / 2,
    "tw": jax.random.normal(k[3], (T, 5), dtype) / 2,
  }
  x = jax.random.normal(k[4], (6, 4), dtype)
  y = jax.random.normal(k[5], (6, T), dtype)

  def fun(p, x, y):
    z = jnp.tanh(x @ p["bottom"])
    zt = jnp.broadcast_to(z, (T, *z.shape)) * p["scale"][:, None, :]
    logits = jnp.einsum("tbh,th->bt", jnp.tanh(zt), p["tw"]) * p["temp"]
    logits = logits + (z @ p["bias"])[:, None]
    return jnp.mean((logits - y) ** 2, 0)

  return fun, p, (x, y)


def test_head_reads_trunk_values():
  fun, params, args = _head_sites_model(jnp.float32)
  cov = coverage(fun, params, args)
  assert cov["['scale']"] == cov["['tw']"] == "task-local (per-task slices)"
  assert_matches(_head_sites_model, "float32")
  with jax.enable_x64(True):
    assert_matches(_head_sites_model, "float64")


def test_single_task():
  """T = 1: every leaf reaches the one loss; K = [|g|^2]."""

  def fun(p, x):
    return jnp.mean(jnp.tanh(x @ p["w"]) ** 2, 0)[:1] + jnp.sum(p["e"][jnp.array([1, 1, 2])])

  params = {"w": jnp.arange(6.0).reshape(3, 2) / 5, "e": jnp.ones((4, 2))}
  x = jnp.ones((2, 3))
  cov = gj.gram_coverage(fun)(params, x)
  assert cov["['e']"] == "task-local (tower)"
  assert cov["['w']"] == "task-local (per-task slices)"  # column 1 reaches no loss
  method = gj.upgrad()
  state = method.init(params)
  losses, grads, _ = jax.jit(gj.combined_value_and_grad(fun, method))(params, state, x)
  _, stacked = gj.per_task_value_and_grad(fun)(params, x)
  ref, _ = method.update(stacked, state, params, task_losses=losses)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _flops(f, *args):
  return f.lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("stacked", [False, True])
def test_towers_pulled_back_once(stacked):
  """Towers dominating the model (T = 8): the lean step's flops stay close
  to a plain step's, where the per-task pullback pays the towers T times."""
  t, b, d, h = 8, 32, 8, 128
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  p = {
    "bottom": jax.random.normal(k[0], (d, 16)) / 3,
    "w1": jax.random.normal(k[1], (t, 16, h)) / 4,
    "w2": jax.random.normal(k[2], (t, h, h)) / 11,
    "o": jax.random.normal(k[3], (t, h)) / 11,
  }
  x = jax.random.normal(k[4], (b, d))

  def tower(w1, w2, o, z):
    return jnp.mean((jnp.tanh(jnp.tanh(z @ w1) @ w2) @ o) ** 2)

  if stacked:

    def fun(p, x):
      z = jnp.tanh(x @ p["bottom"])
      return jax.vmap(tower, in_axes=(0, 0, 0, None))(p["w1"], p["w2"], p["o"], z)

  else:
    p = {
      "bottom": p["bottom"],
      "towers": [{n: p[n][i] for n in ("w1", "w2", "o")} for i in range(t)],
    }

    def fun(p, x):
      z = jnp.tanh(x @ p["bottom"])
      return jnp.stack([tower(tw["w1"], tw["w2"], tw["o"], z) for tw in p["towers"]])

  method = gj.upgrad()
  state = method.init(p)
  plain = _flops(jax.jit(lambda p, x: jax.grad(lambda p: jnp.sum(fun(p, x)))(p)), p, x)
  lean = _flops(jax.jit(gj.combined_value_and_grad(fun, method)), p, state, x)
  assert lean < 1.6 * plain, lean / plain
  if stacked:  # the route it replaces pays the towers T times
    pull = _flops(jax.jit(gj.combined_value_and_grad(fun, method, gram="pullback")), p, state, x)
    assert pull > 4 * plain, pull / plain


LEAN_CASES = [c.name for c in CASES if c.weighting]
FAST = {"gradcraft", "upgrad", "mean"}
SOLVER_TOL = {"cagrad": 5e-3, "nash_mtl": 1e-3}


@pytest.mark.parametrize(
  "name",
  [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in LEAN_CASES],
)
def test_every_method(name):
  """Each weighting method of the library, two steps (states included), on
  a model with tables, experts, separate and stacked towers."""
  assert name in CASE
  assert_matches(ranking_model, "float32", method_key=name, steps=2, tol=SOLVER_TOL.get(name))


def test_gradcraft_on_tables_float64():
  with jax.enable_x64(True):
    assert_matches(embedding_model, "float64", method_key="gradcraft", steps=2)


def test_losses_must_reach_the_towers_through_the_loss_vector():
  """A loss vector assembled by concatenating slices (optax losses,
  jnp.split) keeps the towers task-local."""
  k = jax.random.split(jax.random.PRNGKey(9), 3)
  p = {"bottom": jax.random.normal(k[0], (4, 6)), "head": jax.random.normal(k[1], (6, T))}
  x = jax.random.normal(k[2], (5, 4))

  def fun(p, x):
    logits = jnp.tanh(x @ p["bottom"]) @ p["head"]
    parts = jnp.split(logits, T, axis=1)
    losses = [jnp.mean(optax.sigmoid_binary_cross_entropy(q[:, 0], 1.0)) for q in parts]
    return jnp.concatenate([jnp.reshape(v, (1,)) for v in losses])

  assert gj.gram_coverage(fun)(p, x)["['head']"] == "task-local (per-task slices)"
