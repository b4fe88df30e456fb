"""The dense-layer Gram identity of the lean step, against the stacked path.

The reference Gram matrix is ``gram_matrix`` of the stacked per-task
gradients from ``per_task_value_and_grad`` (itself checked against
``jax.jacrev``). A probe weighting whose weights are linear in every Gram
entry (``w = K c`` for a fixed ``c``) makes the combined gradient
``J^T K c`` sensitive to any error in any block; the probe also records the
Gram matrix it was given, compared entry by entry. ``gram_coverage`` is
asserted as well, so a model that silently stopped taking the dense route
fails here instead of passing on the pullbacks.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcraft_jax as gj
from gradcraft_jax import _dense_gram

T = 3


def _probe():
  c = jnp.array([1.0, -0.5, 0.25])

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    return gram @ c[:num_tasks], gram

  return gj.from_weighting(
    gj.Weighting(lambda p: jnp.zeros((T, T), jnp.float32), weights, name="probe")
  )


def _keys(n):
  return list(jax.random.split(jax.random.PRNGKey(7), n))


def _assert_close(actual, expected, tol, rtol=0.0):
  """Same structure, shapes and dtypes, and every leaf within ``tol`` of
  the expected leaf's largest entry (compared in float32)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)

  def leaf(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=tol * (np.max(np.abs(b)) + 1e-6))

  jax.tree_util.tree_map(leaf, actual, expected)


# ----------------------------------------------------------------- models
# Each returns (fun, params, args, covered leaf paths under gram="dense",
# under gram="auto").


def dense_bias():
  k = _keys(5)
  p = {
    "w1": jax.random.normal(k[0], (16, 8)) / 4,
    "b1": jax.random.normal(k[1], (8,)),
    "w2": jax.random.normal(k[2], (8, T)),
  }
  x = jax.random.normal(k[3], (4, 16))

  def fun(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - 1.0) ** 2, axis=0)

  # w2's column t reaches loss t only: "task-local" unless gram="dense"
  return fun, p, (x,), {"['w1']", "['w2']"}, {"['w1']"}


def mixed():
  """Embedding, a sequence dimension, a jit-wrapped layer, a weight used
  twice, a transposed use, layer norm, a convolution and the head."""
  k = _keys(12)
  p = {
    "emb": jax.random.normal(k[0], (9, 6)),
    "seq": jax.random.normal(k[1], (6, 6)) / 3,
    "w1": jax.random.normal(k[2], (6, 5)) / 3,
    "b1": jax.random.normal(k[3], (5,)),
    "wt": jax.random.normal(k[4], (7, 5)) / 3,  # used as h @ wt.T
    "tied": jax.random.normal(k[5], (7, 7)) / 3,  # used twice
    "ln": jnp.ones(7) + 0.1 * jax.random.normal(k[6], (7,)),
    "conv": jax.random.normal(k[7], (2, 1, 3)) / 2,  # (out, in, width)
    "head": jax.random.normal(k[8], (14, T)) / 3,
  }
  x = jax.random.normal(k[9], (4, 3, 6))
  ids = jnp.array([1, 2, 8, 0])

  @jax.jit
  def layer(h, w, b):
    return jnp.tanh(h @ w + b)

  def fun(p, x, ids):
    e = p["emb"][ids]
    h = jnp.tanh(jnp.einsum("bsd,de->bse", x, p["seq"]).mean(1) + e)
    h = layer(h, p["w1"], p["b1"])
    h = h @ p["wt"].T
    h = jnp.tanh(h @ p["tied"]) @ p["tied"].T
    h = h * p["ln"] / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-3)
    c = jax.lax.conv_general_dilated(h[:, None, :], p["conv"], (1,), "SAME")
    out = c.reshape(4, 14) @ p["head"]
    return jnp.mean((out - 1.0) ** 2, axis=0)

  dense = {"['seq']", "['w1']", "['wt']", "['head']"}
  return fun, p, (x, ids), dense, {"['w1']", "['wt']"}


def weight_on_the_left():
  """y = W @ a^T (the weight as the dot's lhs) and a reshaped 3-D weight."""
  k = _keys(4)
  p = {"w": jax.random.normal(k[0], (5, 12)) / 3, "w3": jax.random.normal(k[1], (5, 2, T)) / 3}
  x = jax.random.normal(k[2], (4, 12))

  def fun(p, x):
    h = jnp.tanh(p["w"] @ x.T)  # (5, 4)
    out = h.T @ p["w3"].reshape(5, 2 * T)  # (4, 2T)
    return jnp.mean(out.reshape(4, 2, T) ** 2, axis=(0, 1))

  return fun, p, (x,), {"['w']", "['w3']"}, {"['w']", "['w3']"}


def bf16_mixed_precision():
  """bfloat16 parameters cast to float32 for the products."""
  k = _keys(3)
  p = {
    "w1": (jax.random.normal(k[0], (16, 8)) / 4).astype(jnp.bfloat16),
    "w2": jax.random.normal(k[1], (8, T)).astype(jnp.bfloat16),
  }
  x = jax.random.normal(k[2], (4, 16))

  def fun(p, x):
    h = jnp.tanh(x @ p["w1"].astype(jnp.float32))
    return jnp.mean((h @ p["w2"].astype(jnp.float32) - 1.0) ** 2, axis=0)

  return fun, p, (x,), {"['w1']", "['w2']"}, {"['w1']"}


def bf16_model():
  """A model computing in bfloat16 throughout."""
  k = _keys(3)
  p = {
    "w1": (jax.random.normal(k[0], (16, 8)) / 4).astype(jnp.bfloat16),
    "w2": jax.random.normal(k[1], (8, T)).astype(jnp.bfloat16),
  }
  x = jax.random.normal(k[2], (4, 16)).astype(jnp.bfloat16)

  def fun(p, x):
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean((h @ p["w2"] - 1.0).astype(jnp.float32) ** 2, axis=0)

  return fun, p, (x,), {"['w1']", "['w2']"}, {"['w1']"}


MODELS = {
  "dense_bias": dense_bias,
  "mixed": mixed,
  "weight_on_the_left": weight_on_the_left,
  "bf16_mixed_precision": bf16_mixed_precision,
  "bf16_model": bf16_model,
}
TOL = {"bf16_mixed_precision": 2e-2, "bf16_model": 5e-2}


@functools.lru_cache(maxsize=None)
def _compiled(model, gram):
  fun, params, args, _, _ = MODELS[model]()
  probe = _probe()
  lean = gj.combined_value_and_grad(fun, probe, gram=gram)
  per_task = gj.per_task_value_and_grad(fun)

  def both(params, state, *args):
    losses, grads, k_lean = lean(params, state, *args)
    _, stacked = per_task(params, *args)
    ref, k_ref = probe.update(stacked, state, params, task_losses=losses)
    return grads, k_lean, ref, k_ref, gj.gram_matrix(stacked)

  return jax.jit(both), params, args, probe.init(params)


@pytest.mark.parametrize("gram", ["dense", "auto"])
@pytest.mark.parametrize("model", list(MODELS))
def test_gram_and_update_equal_stacked(model, gram):
  fn, params, args, state = _compiled(model, gram)
  grads, k_lean, ref, k_ref, k_direct = fn(params, state, *args)
  tol = TOL.get(model, 2e-5)
  scale = float(jnp.max(jnp.abs(k_direct)))
  np.testing.assert_allclose(np.asarray(k_ref), np.asarray(k_direct), atol=tol * scale)
  np.testing.assert_allclose(np.asarray(k_lean), np.asarray(k_ref), atol=tol * scale)
  _assert_close(grads, ref, tol)


@pytest.mark.parametrize("gram", ["dense", "auto"])
@pytest.mark.parametrize("model", list(MODELS))
def test_coverage(model, gram):
  fun, params, args, dense, auto = MODELS[model]()
  cov = gj.gram_coverage(fun, gram=gram)(params, *args)
  assert set(cov) == {
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
  }
  assert {k for k, v in cov.items() if v == "dense"} == (dense if gram == "dense" else auto)


def test_coverage_reasons():
  fun, params, args, _, _ = mixed()
  cov = gj.gram_coverage(fun, gram="dense")(params, *args)
  assert cov["['tied']"] == "used more than once"
  assert cov["['emb']"] == "embedding"
  assert cov["['conv']"] == "used by conv_general_dilated"
  assert "broadcast_in_dim" in cov["['b1']"]
  assert gj.gram_coverage(fun, gram="pullback")(params, *args)["['w1']"] != "dense"


def test_selected_leaves():
  """A Gram matrix over chosen leaves only (Weighting.gram_leaves), with a
  covered and a fallback leaf selected, equals the stacked path's."""
  fun, params, args, _, _ = mixed()
  c = jnp.array([1.0, -0.5, 0.25])
  w = gj.Weighting(
    lambda p: optax.EmptyState(),
    lambda gram, state, losses, *, num_tasks, **kw: (gram @ c, state),
    name="probe_selected",
    gram_leaves=lambda path: path in ("['w1']", "['b1']", "['tied']"),
  )
  method = gj.from_weighting(w)
  lean = jax.jit(gj.combined_value_and_grad(fun, method, gram="dense"))
  _, grads, _ = lean(params, method.init(params), *args)
  _, stacked = gj.per_task_value_and_grad(fun)(params, *args)
  ref, _ = method.update(stacked, method.init(params), params)
  _assert_close(grads, ref, 2e-5, rtol=2e-5)


def test_has_aux_and_argnums_with_dense_gram():
  fun0, params, args, _, _ = dense_bias()

  def fun(p, x):
    losses = fun0(p, x)
    return losses, {"sum": jnp.sum(losses)}

  method = gj.upgrad()
  state = method.init(params)
  (losses, aux), grads, _ = jax.jit(
    gj.combined_value_and_grad(fun, method, argnums=(0, 1), has_aux=True)
  )(params, state, *args)
  (l2, aux2), stacked = gj.per_task_value_and_grad(fun, argnums=(0, 1), has_aux=True)(params, *args)
  ref, _ = method.update(stacked, state, (params, args[0]), task_losses=l2)
  np.testing.assert_allclose(aux["sum"], aux2["sum"], rtol=1e-6)
  chex.assert_trees_all_equal_structs(grads, ref)
  chex.assert_trees_all_close(grads, ref, rtol=1e-4, atol=1e-6)
  cov = gj.gram_coverage(fun, argnums=(0, 1), has_aux=True)(params, *args)
  assert cov["[0]['w1']"] == "dense"
  assert cov["[1]"] == "dense"  # x: the other operand of the same product


def _temp(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_dense_gram_needs_less_memory():
  """Few rows, wide layers: the weight gradients (T copies of a 256 x 256
  weight, per layer) are never formed on the dense route."""
  k = _keys(4)
  params = {f"w{i}": jax.random.normal(k[i], (256, 256)) / 16 for i in range(3)}
  x = jax.random.normal(k[3], (8, 256))

  def fun(p, x):
    h = x
    for i in range(3):
      h = jnp.tanh(h @ p[f"w{i}"])
    return jnp.mean(h.reshape(8, 8, 32) ** 2, axis=(0, 2))

  method = gj.gradcraft()
  state = method.init(params)
  dense = _temp(gj.combined_value_and_grad(fun, method), params, state, x)
  pull = _temp(gj.combined_value_and_grad(fun, method, gram="pullback"), params, state, x)
  assert dense < pull, (dense, pull)


def test_bad_gram_mode():
  with pytest.raises(ValueError, match="gram must be one of"):
    gj.combined_value_and_grad(lambda p: p, gj.mean(), gram="fast")


@pytest.mark.parametrize("model", list(MODELS))
def test_per_task_gradients_equal_jacrev(model):
  """per_task_value_and_grad's batched dense products (stacked layout,
  through the leaf's reshapes, transposes and casts) equal jax.jacrev, and
  the route is taken for at least one leaf of every model."""
  fun, params, args, _, _ = MODELS[model]()
  flat = _dense_gram.Flat(fun, (params, *args), (0,), False)
  plan = _dense_gram.plan(
    flat, [*flat.diff, *flat.arrays], len(flat.diff), _dense_gram.stacked_layout
  )
  assert plan.uses
  losses, stacked = jax.jit(gj.per_task_value_and_grad(fun))(params, *args)
  ref = jax.jacrev(fun)(params, *args)
  _, plain = jax.jit(gj.per_task_value_and_grad(fun, gram="pullback"))(params, *args)
  tol = TOL.get(model, 1e-5)
  _assert_close(stacked, ref, tol)
  _assert_close(stacked, plain, tol)


def test_flax_nnx_and_linen_models():
  """Flax NNX (after nnx.split) and Linen apply: kernels covered, biases and
  layer-norm parameters on their pullbacks, the update equal to the stacked
  path's."""
  import flax.linen as nn
  from flax import nnx

  class NNX(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(64, 32, rngs=rngs)
      self.ln = nnx.LayerNorm(32, rngs=rngs)
      self.l2 = nnx.Linear(32, T, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.ln(jax.nn.relu(self.l1(x))))

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(T)(jnp.tanh(nn.Dense(32)(x)))

  x = jax.random.normal(jax.random.PRNGKey(1), (8, 64))
  graphdef, state = nnx.split(NNX(nnx.Rngs(0)))
  linen = Linen()
  models = [
    (lambda s, x: jnp.mean(nnx.merge(graphdef, s)(x) ** 2, axis=0), state),
    (
      lambda p, x: jnp.mean((linen.apply(p, x) - 1.0) ** 2, axis=0),
      linen.init(jax.random.PRNGKey(0), x),
    ),
  ]
  for fun, params in models:
    cov = gj.gram_coverage(fun)(params, x)
    # the output layer's column t reaches loss t only: task-local
    shapes = {
      jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    out = [k for k in cov if "kernel" in k and shapes[k][-1] == T]
    assert [cov[k] for k in out] == ["task-local (per-task slices)"]
    assert sorted(k for k, v in cov.items() if v == "dense") == sorted(
      k for k in cov if "kernel" in k and k not in out
    )
    method = gj.upgrad()
    st = method.init(params)
    losses, grads, _ = jax.jit(gj.combined_value_and_grad(fun, method))(params, st, x)
    _, stacked = gj.per_task_value_and_grad(fun)(params, x)
    ref, _ = method.update(stacked, st, params, task_losses=losses)
    _assert_close(grads, ref, 1e-6, rtol=1e-4)
