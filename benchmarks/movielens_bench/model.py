"""The ranking models of ``recsys_models`` on MovieLens features, and the
three task losses.

The shared-bottom, MMoE and PLE models of ``recsys_models`` are used as they
are, with their feature module replaced by :class:`MovieLensFeatures`, the
layout of ``recsys_models.Features``: user id and item id embeddings, the
user's history (the last ``history_len`` items of the user's training
interactions before this one, read from the item table and mean-pooled;
width ``embed_dim`` each), and one embedding of width ``side_dim`` per side
feature: age bucket, gender, occupation, zip prefix (user), release-year
bucket and genres (item; a multi-valued feature, mean-pooled over the
item's genres). The feature width is ``3 embed_dim + 6 side_dim``, the
``feature_dim`` of the matching ``RecsysConfig`` (``num_dense = 0``), so the
bottom, experts, gates and towers are the reference models' own.

Tasks (one tower output each): ``click`` (observed vs sampled unobserved
item; binary cross-entropy over every row), ``like`` (``rating >= 4``;
binary cross-entropy over the observed rows only) and ``rating`` (squared
error of ``mean_rating + output`` over the observed rows only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
import recsys_models as R
from flax import nnx

TASKS = ("click", "like", "rating")
CLASSES = {"shared_bottom": R.SharedBottom, "mmoe": R.MMoE, "ple": R.PLE}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the models (the defaults of the benchmark)."""

  embed_dim: int = 32
  side_dim: int = 8
  history_len: int = 20
  bottom: tuple = (128, 64)
  n_experts: int = 4
  n_task_experts: int = 1
  n_levels: int = 2
  expert: tuple = (64, 32)
  tower: tuple = (32,)


def recsys_config(model: str, mc: ModelConfig, n_side: int) -> R.RecsysConfig:
  """The ``RecsysConfig`` whose ``feature_dim`` is the MovieLens feature width."""
  return R.RecsysConfig(
    model=model,
    num_tasks=len(TASKS),
    vocab=2,  # the reference feature module is replaced
    embed_dim=mc.embed_dim,
    side_vocab=(2,) * (n_side + 1),  # the side features and the genres
    side_dim=mc.side_dim,
    history_len=mc.history_len,
    shared_history=True,
    num_dense=0,
    bottom=tuple(mc.bottom),
    n_experts=mc.n_experts,
    n_task_experts=mc.n_task_experts,
    n_levels=mc.n_levels,
    expert=tuple(mc.expert),
    tower=tuple(mc.tower),
    stacked_towers=True,
    stacked_experts=True,
  )


def _mean_pool(emb: jax.Array, ids: jax.Array) -> jax.Array:
  mask = (ids != 0).astype(emb.dtype)
  total = jnp.einsum("bld,bl->bd", emb, mask)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]


class MovieLensFeatures(nnx.Module):
  """``batch (user (B,), item (B,), history (B, L), side (B, 5), genres (B, G))
  -> (B, 3 E + 6 S)`` (ids 0 in ``history`` and ``genres`` are padding)."""

  def __init__(self, n_users, n_items, genre_vocab, side_vocab, mc: ModelConfig, *, rngs):
    e = mc.embed_dim
    self.user = nnx.Embed(n_users + 1, e, rngs=rngs)
    self.item = nnx.Embed(n_items + 1, e, rngs=rngs)
    self.side = nnx.List([nnx.Embed(v, mc.side_dim, rngs=rngs) for v in side_vocab])
    self.genre = nnx.Embed(genre_vocab, mc.side_dim, rngs=rngs)

  def __call__(self, batch: Any) -> jax.Array:
    h, g = batch["history"], batch["genres"]
    parts = [
      self.user(batch["user"]),
      self.item(batch["item"]),
      _mean_pool(self.item(h), h),
      *(table(batch["side"][:, j]) for j, table in enumerate(self.side)),
      _mean_pool(self.genre(g), g),
    ]
    return jnp.concatenate(parts, axis=-1)


def build(model: str, data, mc: ModelConfig = ModelConfig()):
  """``(graphdef, abstract_state)`` of ``model`` on the encoded data's vocabularies."""
  cfg = recsys_config(model, mc, len(data.side_vocab))
  cls = CLASSES[model]

  def make():
    m = cls(cfg, rngs=nnx.Rngs(0))
    m.features = MovieLensFeatures(
      data.n_users, data.n_items, data.genre_vocab, data.side_vocab, mc, rngs=nnx.Rngs(0)
    )
    return m

  return nnx.split(nnx.eval_shape(make))


def init_params(abstract, seed: int):
  """Initial parameters (``recsys_models.draw_params``)."""
  return R.draw_params(abstract, seed)


def make_output_fn(graphdef):
  """``fn(params, batch) -> (B, 3)`` raw outputs (two logits, the rating offset)."""

  def fn(params, batch):
    return nnx.merge(graphdef, params)(batch)

  return fn


def make_loss_fn(graphdef, mean_rating: float):
  """``fn(params, batch) -> (3,)`` losses: click BCE, like BCE and rating MSE
  (the last two over ``batch["observed"]`` rows; 0 if a batch has none)."""
  out_fn = make_output_fn(graphdef)

  def loss_fn(params, batch):
    out = out_fn(params, batch)
    obs = batch["observed"]
    n_obs = jnp.maximum(jnp.sum(obs), 1.0)
    click = jnp.mean(optax.sigmoid_binary_cross_entropy(out[:, 0], batch["click"]))
    like = jnp.sum(optax.sigmoid_binary_cross_entropy(out[:, 1], batch["like"]) * obs) / n_obs
    err = mean_rating + out[:, 2] - batch["rating"]
    rating = jnp.sum(err * err * obs) / n_obs
    return jnp.stack([click, like, rating])

  return loss_fn
