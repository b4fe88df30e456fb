"""Embedding tables in the lean step: Gram blocks from per-id sums of the
lookups' cotangents, never from the tables' ``T`` per-task gradients.

References: ``jax.jacrev`` of the loss (stacked gradients, their Gram
matrix, ``method.update`` on them; ``lean_route_models.py``) and, for the
block itself, a NumPy scatter-add of the cotangents per task.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from lean_route_models import T, assert_matches, coverage, embedding_model, reference

import gradcraft_jax as gj
from gradcraft_jax import _embedding_gram


def test_coverage_names_the_route():
  fun, params, args = embedding_model(jnp.float32)
  cov = coverage(fun, params, args)
  assert cov["['user']"] == "embedding"  # three lookups: x[ids] and a (B, L) take
  assert cov["['item']"] == "embedding"  # two lookups: fill mode and jnp.take
  assert cov["['bias']"] == "embedding"  # a 1-D table
  assert cov["['head']"] == "task-local (per-task slices)"
  pull = coverage(fun, params, args, gram="pullback")
  assert all(v.startswith("per-task pullback") for v in pull.values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_equals_stacked(dtype):
  """Duplicate, negative and out-of-range ids in clip, fill and
  promise_in_bounds modes, a multi-valued feature with padding, shared
  tables: Gram matrix and update equal jacrev's, two steps."""
  with jax.enable_x64(dtype == "float64"):
    assert_matches(embedding_model, dtype, steps=2)


def test_has_aux_and_argnums():
  """The tables as a second differentiated argument, aux values from the
  forward pass."""

  def build(dtype):
    fun, params, args = embedding_model(dtype)
    tables = {k: params[k] for k in ("user", "item", "bias")}
    rest = {k: v for k, v in params.items() if k not in tables}
    return (lambda rest, tables, *a: fun({**rest, **tables}, *a)), rest, (tables, *args)

  assert_matches(build, "float32", argnums=(0, 1), has_aux=True)
  fun, rest, args = build(jnp.float32)
  cov = gj.gram_coverage(fun, argnums=(0, 1))(rest, *args)
  assert cov["[1]['user']"] == "embedding"


def _block_reference(ids, cots, rows, clip):
  """NumPy: the per-task table gradients by scatter-add (clamped or
  dropped ids), then their Gram matrix."""
  t = cots[0].shape[0]
  g = np.zeros((t, rows, cots[0].shape[-1]))
  for idx, d, c in zip(ids, cots, clip):
    for n, i in enumerate(np.asarray(idx).reshape(-1)):
      if c:
        i = min(max(i, 0), rows - 1)
      elif not 0 <= i < rows:
        continue
      g[:, i] += np.asarray(d, np.float64).reshape(t, -1, g.shape[-1])[:, n]
  flat = g.reshape(t, -1)
  return flat @ flat.T


@pytest.mark.parametrize("clip", [(True, False), (False, False), (True, True)])
def test_block_against_numpy(clip):
  """The block from segment sums equals the Gram matrix of the scattered
  gradients: many duplicates, ids out of range on both sides, two lookups
  of different shapes."""
  rng = np.random.default_rng(0)
  rows, width, t = 6, 3, 4
  ids = [rng.integers(-2, rows + 2, (9, 1)), rng.integers(0, 3, (2, 5, 1))]
  cots = [rng.normal(size=(t, 9, width)), rng.normal(size=(t, 2, 5, width))]
  use = _embedding_gram.TableUse(0, (0, 1), clip, rows, width)
  got = _embedding_gram.block(use, [jnp.asarray(i) for i in ids], cots, jnp.float32)
  want = _block_reference(ids, cots, rows, clip)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_all_ids_equal():
  """Every lookup of the same row: the block is |sum of the cotangents|^2."""
  rng = np.random.default_rng(1)
  d = rng.normal(size=(3, 50, 4))
  use = _embedding_gram.TableUse(0, (0,), (False,), 1000, 4)
  got = _embedding_gram.block(use, [jnp.full((50, 1), 7)], [d], jnp.float32)
  s = d.sum(1)
  np.testing.assert_allclose(np.asarray(got), s @ s.T, rtol=1e-5)


def _nnx_model(dtype):
  k = nnx.Rngs(0)
  model = {
    "emb": nnx.Embed(12, 4, rngs=k, param_dtype=dtype),
    "lin": nnx.Linear(8, T, rngs=k, param_dtype=dtype),
  }
  graphdef, state = nnx.split(model)
  ids = jnp.array([[0, 3], [3, 3], [11, 2], [5, 0]], jnp.int32)
  y = jnp.ones((4, T), dtype)

  def fun(state, ids, y):
    m = nnx.merge(graphdef, state)
    x = m["emb"](ids).reshape(4, 8)
    return jnp.mean((jnp.tanh(m["lin"](x)) - y) ** 2, axis=0)

  return fun, state, (ids, y)


def _linen_model(dtype):
  class Net(linen.Module):
    @linen.compact
    def __call__(self, ids):
      x = linen.Embed(12, 4, param_dtype=dtype)(ids).reshape(ids.shape[0], -1)
      return linen.Dense(T, param_dtype=dtype)(jnp.tanh(x))

  net = Net()
  ids = jnp.array([[0, 3], [3, 3], [11, 2], [5, 0]], jnp.int32)
  params = net.init(jax.random.PRNGKey(0), ids)
  y = jnp.ones((4, T), dtype)

  def fun(params, ids, y):
    return jnp.mean((net.apply(params, ids) - y) ** 2, axis=0)

  return fun, params, (ids, y)


@pytest.mark.parametrize("build", [_nnx_model, _linen_model], ids=["nnx", "linen"])
def test_flax_embed(build):
  fun, params, args = build(jnp.float32)
  cov = coverage(fun, params, args)
  assert [v for k, v in cov.items() if "embedding" in k] == ["embedding"]
  assert_matches(build, "float32")


def _fallback_model(dtype):
  """Uses the analysis cannot prove to be row lookups: a tied table (gather
  and output projection), a column gather, an element gather."""
  k = jax.random.split(jax.random.PRNGKey(5), 4)
  p = {
    "tied": jax.random.normal(k[0], (7, T), dtype),
    "cols": jax.random.normal(k[1], (T, 7), dtype),
    "elems": jax.random.normal(k[2], (7, 5), dtype),
  }
  ids = jnp.array([1, 1, 4, 6], jnp.int32)

  def fun(p, ids):
    h = jnp.tanh(p["tied"][ids] + p["cols"][:, ids].T + p["elems"][ids, ids][:, None])
    return jnp.mean((h @ p["tied"].T) ** 2, axis=1)[:T] + jnp.mean(h**2, axis=0)

  return fun, p, (ids,)


def test_fallback_reasons():
  fun, params, args = _fallback_model(jnp.float32)
  cov = coverage(fun, params, args)
  assert cov["['tied']"] == "used by gather and transpose"
  assert cov["['cols']"] == "used by gather (not a lookup of whole rows)"
  assert cov["['elems']"] == "used by gather (not a lookup of whole rows)"
  assert_matches(_fallback_model, "float32")


def test_table_memory_not_times_tasks():
  """A 200k x 32 table and T = 8: the lean step's temporary memory stays a
  small fraction of one table (the plain step holds none either), while
  the per-task pullback holds T tables."""
  v, d, t, b = 200_000, 32, 8, 256
  rng = np.random.default_rng(0)
  params = {
    "emb": jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
    "w": jnp.asarray(rng.normal(size=(d, t)), jnp.float32),
  }
  ids = jnp.asarray(rng.integers(0, v, (b, 2)), jnp.int32)
  y = jnp.zeros((b, t))

  def fun(p, ids, y):
    x = p["emb"][ids].sum(1)
    return jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2, 0)

  def temp(f, *a):
    return f.lower(*a).compile().memory_analysis().temp_size_in_bytes

  method = gj.upgrad()
  state = method.init(params)
  table = v * d * 4
  plain = jax.jit(lambda p, ids, y: jax.grad(lambda p: jnp.sum(fun(p, ids, y)))(p))
  lean = jax.jit(gj.combined_value_and_grad(fun, method))
  pull = jax.jit(gj.combined_value_and_grad(fun, method, gram="pullback"))
  assert gj.gram_coverage(fun)(params, ids, y)["['emb']"] == "embedding"
  assert temp(pull, params, state, ids, y) >= t * table  # the route it replaces
  lean_temp = temp(lean, params, state, ids, y)
  assert lean_temp < 0.25 * table, (lean_temp, table)
  assert lean_temp < temp(plain, params, ids, y) + 0.25 * table


def test_every_gather_mode_against_jacrev_directly():
  """The three gather modes one at a time, each with out-of-range ids, the
  update of a real method (UPGrad) against jacrev's stacked path."""
  ids = jnp.array([0, 3, 3, 9, -1, -7, 2], jnp.int32)
  table = jax.random.normal(jax.random.PRNGKey(8), (5, 3))
  w = jax.random.normal(jax.random.PRNGKey(9), (3, T))
  for get in (
    lambda e: e[ids],
    lambda e: e.at[ids].get(mode="clip"),
    lambda e: e.at[ids].get(mode="fill", fill_value=0.5),
  ):

    def fun(p, get=get):
      return jnp.mean(jnp.tanh(get(p["e"]) @ p["w"]) ** 2, axis=0)

    params = {"e": table, "w": w}
    assert gj.gram_coverage(fun)(params)["['e']"] == "embedding"
    method = gj.upgrad()
    state = method.init(params)
    _, grads, _ = jax.jit(gj.combined_value_and_grad(fun, method))(params, state)
    _, ref, _, _ = jax.jit(reference(fun, method))(params, state)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gram_over_the_table_alone():
  """A Gram matrix over the table alone (Weighting.gram_leaves) equals the
  Gram matrix of jacrev's table gradients."""
  fun, params, args = embedding_model(jnp.float32)

  def weights(gram, state, losses, *, num_tasks, **kw):
    return jnp.ones(num_tasks), gram

  method = gj.from_weighting(
    gj.Weighting(
      lambda p: jnp.zeros((T, T)), weights, name="table_only", gram_leaves=lambda p: "user" in p
    )
  )
  step = jax.jit(gj.combined_value_and_grad(fun, method))
  _, _, gram = step(params, method.init(params), *args)
  jac = jax.jacrev(fun)(params, *args)["user"].reshape(T, -1)
  want = np.asarray(jac @ jac.T)
  np.testing.assert_allclose(np.asarray(gram), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
