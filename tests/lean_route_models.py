"""Ranking-style models and the stacked reference for the lean step's routes.

Shared by ``test_embedding_gram.py`` and ``test_tower_gram.py``. Every
model is ``build(dtype) -> (fun, params, args)`` with ``fun(params, *args)``
returning ``T`` task losses. The reference is built from independent
pieces: ``jax.jacrev`` of the loss function (the stacked per-task
gradients), ``gram_matrix`` of them and ``method.update`` on them.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from method_cases import CASES, IDS

import gradcraft_jax as gj

T = 3
CASE = dict(zip(IDS, CASES))


def probe(num_tasks=T):
  """A weighting whose weights are linear in every Gram entry (``w = K c``):
  the combined update ``J^T K c`` is sensitive to an error in any block, and
  the state records the Gram matrix it was given."""
  c = jnp.array([1.0, -0.5, 0.25, 0.75, -0.25, 0.5, 0.3, -0.7, 0.2, 0.6])[:num_tasks]

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    return gram @ c.astype(gram.dtype), gram

  return gj.from_weighting(
    gj.Weighting(
      lambda p: jnp.zeros((num_tasks, num_tasks), jnp.float32), weights, name="route_probe"
    )
  )


def reference(fun, method, argnums=0, has_aux=False, extra=None):
  """``step(params, state, *args) -> (value, grads, new_state, gram)`` of the
  stacked path: jacrev's stacked gradients, their Gram matrix, the update."""
  extra = extra or {}

  def step(params, state, *args):
    full = (params, *args)
    value = fun(*full)
    losses = value[0] if has_aux else value
    jac = jax.jacrev(fun, argnums=argnums, has_aux=has_aux)(*full)
    stacked = jac[0] if has_aux else jac
    diff = full[argnums] if isinstance(argnums, int) else tuple(full[i] for i in argnums)
    grads, new_state = method.update(stacked, state, diff, task_losses=losses, **extra)
    return value, grads, new_state, gj.gram_matrix(stacked)

  return step


@functools.lru_cache(maxsize=None)
def compiled_pair(build, dtype_name, method_key, argnums=0, has_aux=False, gram="auto"):
  """One jitted function returning the lean step's and the reference's
  results for a model (cached per model, dtype, method)."""
  dtype = jnp.dtype(dtype_name)
  fun, params, args = build(dtype)
  if has_aux:
    base = fun

    def fun(*a):  # aux from trunk and head values alike
      losses = base(*a)
      return losses, {"total": jnp.sum(losses), "first": losses[0], "arg": a[-1]}

  if method_key == "probe":
    method, extra = probe(), {}
  else:
    case = CASE[method_key]
    method = case.make(T)
    extra = case.extra(T, np.random.default_rng(0)) if case.extra is not None else {}
  lean = gj.combined_value_and_grad(fun, method, argnums=argnums, has_aux=has_aux, gram=gram)
  ref = reference(fun, method, argnums, has_aux, extra)

  def both(params, state, *args):
    return lean(params, state, *args, **extra), ref(params, state, *args)

  return jax.jit(both), fun, params, args, method


def assert_matches(
  build, dtype, method_key="probe", argnums=0, has_aux=False, steps=1, tol=None, gram="auto"
):
  """The lean step equals the stacked path (value, Gram matrix for the
  probe, update, state) over ``steps`` steps; ``method_key``: "probe" or a
  method's name in ``method_cases``."""
  both, fun, params, args, method = compiled_pair(
    build, jnp.dtype(dtype).name, method_key, argnums, has_aux, gram
  )
  f64 = jnp.dtype(dtype) == jnp.float64
  tol = tol or (1e-10 if f64 else 3e-5)
  state = method.init(params)
  for _ in range(steps):
    (value, grads, new_state), (ref_value, ref_grads, ref_state, gram) = both(params, state, *args)
    scale = float(jnp.max(jnp.abs(gram)))
    chex.assert_trees_all_close(value, ref_value, rtol=tol, atol=tol)
    if method_key == "probe":
      chex.assert_trees_all_close(new_state, gram, atol=tol * scale, rtol=0)
    gscale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(ref_grads))
    chex.assert_trees_all_close(grads, ref_grads, atol=tol * max(gscale, 1e-30), rtol=tol)
    chex.assert_trees_all_equal_dtypes(grads, ref_grads)
    chex.assert_trees_all_close(new_state, ref_state, atol=tol * max(scale, 1.0), rtol=tol)
    state = ref_state
    if argnums == 0:
      params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, ref_grads)
  return gram


def coverage(fun, params, args, **kw):
  return gj.gram_coverage(fun, **kw)(params, *args)


# ------------------------------------------------------------------ models


def _normal(key, shape, scale, dtype):
  return (scale * jax.random.normal(key, shape)).astype(dtype)


def embedding_model(dtype):
  """Two tables and a per-id bias: duplicate, negative and out-of-range
  ids in every gather mode, a multi-valued feature with padding (masked mean
  pooling) sharing the user table, two features sharing the item table."""
  k = jax.random.split(jax.random.PRNGKey(0), 8)
  v, d, b = 13, 4, 8
  p = {
    "user": _normal(k[0], (v, d), 1.0, dtype),
    "item": _normal(k[1], (v, d), 1.0, dtype),
    "bias": _normal(k[2], (v,), 1.0, dtype),
    "w1": _normal(k[3], (4 * d, 6), 0.4, dtype),
    "b1": _normal(k[4], (6,), 0.1, dtype),
    "head": _normal(k[5], (6, T), 0.5, dtype),
  }
  uid = jnp.array([0, 1, 1, 15, -2, 3, 3, 3], jnp.int32)  # dup, out of range, negative
  hist = jnp.array(
    [[1, 2, 0], [3, 3, 0], [6, 0, 0], [1, 1, 1], [20, 2, 0], [4, 5, 6], [0, 0, 0], [12, 12, 3]],
    jnp.int32,
  )  # 0: padding; 20 clamps to the last row
  iid = jnp.array([2, 2, 2, 5, 14, 0, -1, 12], jnp.int32)  # 14: dropped, -1 wraps
  iid2 = jnp.array([2, 5, 5, 5, 7, 0, 11, 12], jnp.int32)
  y = _normal(k[6], (b, T), 1.0, dtype)

  def fun(p, uid, hist, iid, iid2, y):
    u = p["user"][uid]  # promise_in_bounds: the 15 is dropped from the gradient
    mask = (hist != 0).astype(dtype)[..., None]
    h = jnp.take(p["user"], hist, axis=0, mode="clip")
    h = jnp.sum(h * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)
    i1 = p["item"].at[iid].get(mode="fill", fill_value=0.0)
    i2 = jnp.take(p["item"], iid2, axis=0)  # fill mode (jnp.take's default), in range
    x = jnp.concatenate([u, h, i1, i2], -1)
    z = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = z @ p["head"] + p["bias"][iid2][:, None]
    return jnp.mean((logits - y) ** 2, axis=0)

  return fun, p, (uid, hist, iid, iid2, y)


def tower_model(dtype):
  """A shared bottom over an embedding, one tower per task as separate
  leaves, and the losses stacked."""
  k = jax.random.split(jax.random.PRNGKey(1), 4 + 3 * T)
  v, d, b, h = 11, 4, 8, 6
  p = {
    "emb": _normal(k[0], (v, d), 1.0, dtype),
    "bottom": _normal(k[1], (2 * d, h), 0.4, dtype),
    "towers": [
      {
        "w": _normal(k[4 + 3 * t], (h, 5), 0.4, dtype),
        "b": _normal(k[5 + 3 * t], (5,), 0.1, dtype),
        "o": _normal(k[6 + 3 * t], (5,), 0.5, dtype),
      }
      for t in range(T)
    ],
  }
  ids = jnp.array([[1, 2], [2, 2], [3, 0], [10, 1], [4, 4], [5, 6], [7, 7], [1, 9]], jnp.int32)
  y = (jax.random.uniform(k[2], (b, T)) < 0.5).astype(dtype)

  def fun(p, ids, y):
    x = p["emb"][ids].reshape(b, 2 * d)
    z = jax.nn.relu(x @ p["bottom"])
    losses = []
    for t, tw in enumerate(p["towers"]):
      logit = jnp.tanh(z @ tw["w"] + tw["b"]) @ tw["o"]
      losses.append(jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y[:, t])))
    return jnp.stack(losses)

  return fun, p, (ids, y)


def stacked_tower_model(dtype):
  """Towers stacked on a leading task axis, used through einsum and through
  jax.vmap; a (H, T) head whose column t is task t's."""
  k = jax.random.split(jax.random.PRNGKey(2), 10)
  b, d, h, kk = 8, 5, 6, 4
  p = {
    "bottom": _normal(k[0], (d, h), 0.5, dtype),
    "tw": _normal(k[1], (T, h, kk), 0.4, dtype),
    "tb": _normal(k[2], (T, kk), 0.1, dtype),
    "to": _normal(k[3], (T, kk), 0.5, dtype),
    "vw": _normal(k[4], (T, h, kk), 0.4, dtype),
    "head": _normal(k[5], (h, T), 0.4, dtype),
  }
  x = _normal(k[6], (b, d), 1.0, dtype)
  y = (jax.random.uniform(k[7], (b, T)) < 0.5).astype(dtype)

  def tower(w, o, z):
    return jax.nn.relu(z @ w) @ o

  def fun(p, x, y):
    z = jnp.tanh(x @ p["bottom"])
    a = jax.nn.relu(jnp.einsum("bh,thk->tbk", z, p["tw"]) + p["tb"][:, None, :])
    logits = jnp.einsum("tbk,tk->bt", a, p["to"])
    logits = logits + jax.vmap(tower, in_axes=(0, 0, None), out_axes=1)(p["vw"], p["to"], z)
    logits = logits + z @ p["head"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y), axis=0)

  return fun, p, (x, y)


def mmoe_model(dtype):
  """MMoE: an embedding, stacked experts (a dot without and one with batch
  dimensions), per-task softmax gates stacked on a task axis, the mixture,
  stacked towers."""
  k = jax.random.split(jax.random.PRNGKey(3), 12)
  v, d, b, e, h, kk = 9, 4, 8, 3, 5, 4
  p = {
    "emb": _normal(k[0], (v, d), 1.0, dtype),
    "ex1": _normal(k[1], (e, 2 * d, h), 0.4, dtype),
    "ex2": _normal(k[2], (e, h, h), 0.4, dtype),
    "gate": _normal(k[3], (T, 2 * d, e), 0.5, dtype),
    "tw": _normal(k[4], (T, h, kk), 0.4, dtype),
    "to": _normal(k[5], (T, kk), 0.5, dtype),
  }
  ids = jnp.array([[0, 1], [1, 1], [2, 8], [3, 3], [4, 0], [8, 8], [6, 2], [7, 1]], jnp.int32)
  y = _normal(k[6], (b, T), 1.0, dtype)

  def fun(p, ids, y):
    x = p["emb"][ids].reshape(b, 2 * d)
    ex = jnp.tanh(jnp.einsum("bd,edh->ebh", x, p["ex1"]))
    ex = jnp.tanh(jnp.einsum("ebh,ehk->ebk", ex, p["ex2"]))  # batch dimension e
    g = jax.nn.softmax(jnp.einsum("bd,tde->tbe", x, p["gate"]), axis=-1)
    m = jnp.einsum("tbe,ebh->tbh", g, ex)
    z = jax.nn.relu(jnp.einsum("tbh,thk->tbk", m, p["tw"]))
    out = jnp.einsum("tbk,tk->tb", z, p["to"])
    return jnp.mean((out - y.T) ** 2, axis=1)

  return fun, p, (ids, y)


def ranking_model(dtype):
  """Everything at once, for the sweep over methods: embedding tables, a
  dense bottom, experts, separate and stacked towers."""
  k = jax.random.split(jax.random.PRNGKey(4), 12)
  v, d, b, h = 10, 3, 6, 5
  p = {
    "user": _normal(k[0], (v, d), 1.0, dtype),
    "item": _normal(k[1], (v, d), 1.0, dtype),
    "bottom": _normal(k[2], (2 * d, h), 0.5, dtype),
    "ex": _normal(k[3], (2, h, h), 0.4, dtype),
    "tower0": _normal(k[4], (h, 1), 0.5, dtype),
    "towers": _normal(k[5], (T - 1, h), 0.5, dtype),
  }
  uid = jnp.array([1, 1, 3, 12, 0, 9], jnp.int32)
  iid = jnp.array([[2, 2], [5, 0], [5, 5], [9, 1], [0, 0], [3, 4]], jnp.int32)
  y = _normal(k[6], (b, T), 1.0, dtype)

  def fun(p, uid, iid, y):
    items = jnp.sum(p["item"][iid] * (iid != 0)[..., None], 1)
    x = jnp.concatenate([p["user"][uid], items], -1)
    z = jnp.tanh(x @ p["bottom"])
    ex = jnp.tanh(jnp.einsum("bh,ehk->ebk", z, p["ex"])).mean(0)
    first = (ex @ p["tower0"])[:, 0]
    rest = jnp.einsum("bh,th->tb", ex, p["towers"])
    out = jnp.concatenate([first[None], rest], 0)
    return jnp.mean((out - y.T) ** 2, axis=1)

  return fun, p, (uid, iid, y)


def ple_model(dtype):
  """PLE-style: two task experts per task stacked ``(2T, D, H)`` (their
  outputs reshaped to ``(B, T, 2, H)``), shared experts, per-task gates over
  own and shared experts, then separate towers reading ``mixed[:, t]``."""
  k = jax.random.split(jax.random.PRNGKey(10), 8 + T)
  b, d, h, ns = 6, 5, 4, 2
  p = {
    "task_ex": _normal(k[0], (2 * T, d, h), 0.5, dtype),
    "shared_ex": _normal(k[1], (ns, d, h), 0.5, dtype),
    "gates": _normal(k[2], (T, d, 2 + ns), 0.5, dtype),
    "towers": [_normal(k[8 + t], (h,), 0.5, dtype) for t in range(T)],
  }
  x = _normal(k[3], (b, d), 1.0, dtype)
  y = _normal(k[4], (b, T), 1.0, dtype)

  def fun(p, x, y):
    own = jnp.tanh(jnp.einsum("bd,ndh->bnh", x, p["task_ex"])).reshape(b, T, 2, h)
    shared = jnp.tanh(jnp.einsum("bd,ndh->bnh", x, p["shared_ex"]))
    cands = jnp.concatenate([own, jnp.broadcast_to(shared[:, None], (b, T, ns, h))], axis=2)
    g = jax.nn.softmax(jnp.einsum("bd,tdn->btn", x, p["gates"]), axis=-1)
    mixed = jnp.einsum("btn,btnh->bth", g, cands)
    out = jnp.stack([mixed[:, t] @ p["towers"][t] for t in range(T)], axis=1)
    return jnp.mean((out - y) ** 2, axis=0)

  return fun, p, (x, y)
