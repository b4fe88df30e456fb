"""A lean training step written by hand for one model: the shared-bottom
ranking model of ``recsys_models.py`` (stacked towers, the history read from
the item table).

It is the yardstick of the library's general route on ranking models: what a
careful engineer would write for this one model, knowing where its tables
are. Every method's update is ``J^T w`` and ``w`` depends on the per-task
gradients only through the Gram matrix ``K = J J^T``; the step

1. gathers the lookups (user, item, history, side features) itself and makes
   them explicit inputs of the rest of the model;
2. runs one ``jax.vjp`` of the rest and pulls the ``T`` one-hot cotangents
   back with one ``vmap`` (the dense leaves' stacked gradients: small; the
   lookups' per-task cotangents ``d_t``, ``(T, N, D)``);
3. forms each table's block from the per-id sums of its lookups' cotangents,
   ``S_t[v] = sum_{n: ids[n] = v} d_t[n]``, ``K_E = sum_v S_s[v] . S_t[v]``
   (``jnp.unique`` + ``segment_sum``: memory ``O(T N D)``, not ``O(T V D)``;
   the item table's two features go into one sum, so their cross terms are
   included), and the dense leaves' blocks from their stacked gradients;
4. computes the weights (:func:`gradcraft_jax.task_weights`), pulls ``w``
   back once and scatters the lookups' weighted cotangents into each table
   (one scatter per feature, as a plain step does).

Parameters are the model's ``nnx.to_pure_dict`` (nested dicts of arrays).
This is a plain module used by the benchmarks and the tests (``sys.path``
must include ``benchmarks/``); it is not part of the ``gradcraft_jax``
package.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from recsys_models import PAD, RecsysConfig

import gradcraft_jax as gj

__all__ = ["lookups", "head_losses", "gram_and_grad", "make_step"]


def _check(cfg: RecsysConfig) -> None:
  if cfg.model != "shared_bottom" or not cfg.stacked_towers or not cfg.shared_history:
    raise ValueError(
      "the hand-written step covers the shared-bottom model with stacked towers and the "
      f"history read from the item table; got model={cfg.model!r}, "
      f"stacked_towers={cfg.stacked_towers}, shared_history={cfg.shared_history}"
    )


def _tables(p: dict) -> dict:
  """Table name -> ``(V, D)`` array."""
  f = p["features"]
  out = {"user": f["user"]["embedding"], "item": f["item"]["embedding"]}
  out.update({f"side{j}": t["embedding"] for j, t in f["side"].items()})
  return out


# feature -> (table, ids of the batch)
def _features(batch: Any, n_side: int) -> dict:
  out = {"user": ("user", batch["user"]), "item": ("item", batch["item"])}
  out["history"] = ("item", batch["history"])
  out.update({f"side{j}": (f"side{j}", batch["side"][:, j]) for j in range(n_side)})
  return out


def lookups(p: dict, batch: Any) -> dict:
  """Feature -> its gathered embeddings (``ids.shape + (D,)``)."""
  tables = _tables(p)
  feats = _features(batch, len(tables) - 2)
  return {name: tables[t][ids] for name, (t, ids) in feats.items()}


def _dense_part(p: dict) -> dict:
  return {"bottom": p["bottom"], "towers": p["towers"]}


def head_losses(dense: dict, looked_up: dict, batch: Any) -> jax.Array:
  """``(T,)`` losses of the model from its lookups (the model after its gathers)."""
  hist = looked_up["history"]
  mask = (batch["history"] != PAD).astype(hist.dtype)
  pooled = jnp.einsum("bld,bl->bd", hist, mask) / jnp.maximum(mask.sum(1), 1.0)[:, None]
  n_side = len(looked_up) - 3
  x = jnp.concatenate(
    [looked_up["user"], looked_up["item"], pooled]
    + [looked_up[f"side{j}"] for j in range(n_side)]
    + [jnp.asarray(batch["dense"], hist.dtype)],
    axis=-1,
  )
  for layer in dense["bottom"]["layers"].values():
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  layers = list(dense["towers"]["mlp"]["layers"].values())
  h = jnp.einsum("bi,nio->bno", x, layers[0]["kernel"]) + layers[0]["bias"]
  for layer in layers[1:]:
    h = jnp.einsum("bni,nio->bno", jax.nn.relu(h), layer["kernel"]) + layer["bias"]
  logits = h[..., 0]
  labels = jnp.asarray(batch["labels"], logits.dtype)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=0)


def _table_block(ids: jax.Array, d: jax.Array) -> jax.Array:
  """``(T, T)`` Gram block of a table from its lookups' ids ``(N,)`` and
  per-task cotangents ``(T, N, D)``: per-id sums, then their inner products."""
  n = ids.shape[0]
  _, inv = jnp.unique(ids, size=n, fill_value=0, return_inverse=True)
  s = jax.ops.segment_sum(jnp.moveaxis(d, 0, 1), inv.reshape(-1), num_segments=n)  # (N, T, D)
  return jnp.einsum("ntd,nsd->ts", s, s)


def gram_and_grad(p: dict, batch: Any, method: Any, method_state: Any):
  """``(losses (T,), K (T, T), combined gradient (like p), new method state)``."""
  tables = _tables(p)
  feats = _features(batch, len(tables) - 2)
  dense = _dense_part(p)
  looked_up = lookups(p, batch)
  losses, vjp = jax.vjp(lambda d, o: head_losses(d, o, batch), dense, looked_up)
  t = losses.shape[0]
  g_dense, d_out = jax.vmap(vjp)(jnp.eye(t, dtype=losses.dtype))
  flat = jnp.concatenate([g.reshape(t, -1) for g in jax.tree.leaves(g_dense)], axis=1)
  gram = flat @ flat.T
  for table in tables:
    names = [n for n, (tb, _) in feats.items() if tb == table]
    ids = jnp.concatenate([feats[n][1].reshape(-1) for n in names])
    d = jnp.concatenate([d_out[n].reshape(t, -1, d_out[n].shape[-1]) for n in names], axis=1)
    gram = gram + _table_block(ids, d)
  w, method_state = gj.task_weights(method, None, method_state, gram=gram, task_losses=losses)
  gd, go = vjp(w.astype(losses.dtype))
  grads = {"bottom": gd["bottom"], "towers": gd["towers"], "features": {}}
  table_grads = {name: jnp.zeros_like(tables[name]) for name in tables}
  for name, (table, ids) in feats.items():
    table_grads[table] = table_grads[table].at[ids].add(go[name])
  f = grads["features"]
  f["user"] = {"embedding": table_grads["user"]}
  f["item"] = {"embedding": table_grads["item"]}
  f["side"] = {j: {"embedding": table_grads[f"side{j}"]} for j in range(len(tables) - 2)}
  return losses, gram, grads, method_state


def make_step(cfg: RecsysConfig, method: Any, optimizer: optax.GradientTransformation):
  """``step(p, opt_state, method_state, batch) -> (p, opt_state, method_state)``
  (not jitted), for the shared-bottom model of ``cfg``."""
  _check(cfg)

  def step(p, opt_state, method_state, batch):
    _, _, g, method_state = gram_and_grad(p, batch, method, method_state)
    upd, opt_state = optimizer.update(g, opt_state, p)
    return optax.apply_updates(p, upd), opt_state, method_state

  return step
