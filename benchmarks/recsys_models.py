"""Ranking models with embedding tables (Flax NNX) and synthetic click data.

Three multi-task ranking architectures over the same features, each with one
sigmoid head (binary cross-entropy) per task:

* ``"shared_bottom"``: a shared MLP over the features, then one tower per task;
* ``"mmoe"``: multi-gate mixture of experts (Ma et al., KDD 2018): shared
  experts, one softmax gate and one tower per task;
* ``"ple"``: progressive layered extraction (Tang et al., RecSys 2020):
  shared and task-specific experts in ``n_levels`` extraction layers, one
  gate per task (and one for the shared experts below the last layer), then
  one tower per task.

Features (:class:`Features`), as in an industrial click-through model:

* ``user`` and ``item`` ids, each read from an embedding table of ``vocab``
  rows x ``embed_dim`` (``nnx.Embed``, a ``jnp.take`` gather);
* ``history``: a multi-valued feature, the ``(B, history_len)`` ids of items
  the user interacted with, padded with id ``0`` (a row no item uses), read
  from the item table (``shared_history=True``, one vocabulary read by two
  features) or from a table of its own, masked and mean-pooled;
* ``side``: small categorical features (e.g. an item category and an hour of
  day), one ``(side_vocab[j], side_dim)`` table each;
* ``dense``: ``num_dense`` real-valued features.

Per-task modules (towers, and gates of MMoE/PLE) are either separate modules,
one per task (``stacked_towers=False``), or one module whose weights have a
leading task axis ``(T, H, K)`` applied with ``einsum`` (``True``); experts are
separate MLPs (``stacked_experts=False``) or stacked ``(E, D, H)`` weights
applied with ``einsum`` (a ``dot_general`` with a batch dimension from the
second layer on).

The synthetic data (:func:`make_batch_fn`) draws ids from a Zipf-like
(log-uniform) distribution, so that a batch holds many duplicate ids, and
labels from a fixed random teacher (hashed latent factors of the ids, the side
features and the dense features), so that the task losses go down in
training. All ids are valid (in range).

:func:`build` gives what a training step needs in plain JAX::

    loss_fn, params, batch_fn = build(RecsysConfig(model="mmoe", vocab=50_000))
    losses = loss_fn(params, batch_fn(jax.random.PRNGKey(0), 1024))  # (T,)

``params`` is the ``nnx.State`` of the model's parameters (a pytree).

This is a plain module used by the benchmarks, the examples and the tests
(``sys.path`` must include ``benchmarks/``); it is not part of the
``gradcraft_jax`` package. ``recsys_models_torch.py`` mirrors the models in
PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
  "MODELS",
  "RecsysConfig",
  "Features",
  "StackedDense",
  "StackedMLP",
  "MLP",
  "SharedBottom",
  "MMoE",
  "PLE",
  "make_model",
  "init",
  "draw_params",
  "make_loss_fn",
  "make_logits_fn",
  "make_batch_fn",
  "build",
  "auc",
  "num_params",
]

MODELS = ("shared_bottom", "mmoe", "ple")
PAD = 0  # padding id of the history feature (item ids start at 1)
_LATENT = 8  # latent factors per id of the synthetic teacher


@dataclasses.dataclass(frozen=True)
class RecsysConfig:
  """Sizes of a ranking model.

  Attributes:
    model: ``"shared_bottom"``, ``"mmoe"`` or ``"ple"``.
    num_tasks: number of tasks ``T`` (one sigmoid head each).
    vocab: rows of the user id and item id tables (and of the history table
      when it is not shared).
    embed_dim: width of the user, item and history embeddings.
    side_vocab: vocabulary size of each small categorical feature.
    side_dim: width of their embeddings.
    history_len: ``L``, ids per row of the multi-valued history feature.
    shared_history: the history feature reads the item table (one vocabulary,
      two features); otherwise a table of its own.
    num_dense: number of real-valued features.
    bottom: layer sizes of the shared bottom MLP (``shared_bottom``).
    n_experts: shared experts (``mmoe``; per extraction layer for ``ple``).
    n_task_experts: task-specific experts per task and layer (``ple``).
    n_levels: extraction layers (``ple``).
    expert: layer sizes of each expert MLP (``mmoe``, ``ple``).
    tower: hidden layer sizes of each task tower (a 1-unit logit layer follows).
    stacked_towers: towers (and gates) as one module with a leading task axis
      (``einsum``) instead of ``T`` separate modules.
    stacked_experts: experts as stacked ``(E, D, H)`` weights (``einsum``)
      instead of separate modules.
  """

  model: str = "shared_bottom"
  num_tasks: int = 8
  vocab: int = 500_000
  embed_dim: int = 32
  side_vocab: tuple[int, ...] = (1_000, 24)
  side_dim: int = 8
  history_len: int = 10
  shared_history: bool = True
  num_dense: int = 8
  bottom: tuple[int, ...] = (256, 256)
  n_experts: int = 4
  n_task_experts: int = 1
  n_levels: int = 2
  expert: tuple[int, ...] = (256, 128)
  tower: tuple[int, ...] = (64,)
  stacked_towers: bool = True
  stacked_experts: bool = True

  def __post_init__(self):
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
    if self.num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
    if self.vocab < 2:
      raise ValueError(f"vocab must be >= 2 (row 0 is the history padding), got {self.vocab}")
    if self.history_len < 1:
      raise ValueError(f"history_len must be >= 1, got {self.history_len}")
    if self.n_levels < 1:
      raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")
    if not self.expert or not self.bottom:
      raise ValueError("expert and bottom need at least one layer")

  @property
  def feature_dim(self) -> int:
    """Width of the concatenated features (the bottom's input)."""
    return 3 * self.embed_dim + len(self.side_vocab) * self.side_dim + self.num_dense


# ------------------------------------------------------------------ modules


def _init(key: jax.Array, shape: Sequence[int], fan_in: int) -> jax.Array:
  """LeCun normal, as ``nnx.Linear``'s default (variance 1 / fan_in)."""
  return (
    jax.random.truncated_normal(key, -2.0, 2.0, tuple(shape), jnp.float32)
    * (0.8796256610342398 * np.sqrt(fan_in)) ** -1
  )


class MLP(nnx.Module):
  """Dense layers with ReLU between them (and after the last if ``final_relu``).

  Call: ``(..., in_dim) -> (..., sizes[-1])``.
  """

  def __init__(self, in_dim: int, sizes: Sequence[int], *, final_relu: bool, rngs: nnx.Rngs):
    dims = (int(in_dim), *(int(s) for s in sizes))
    self.final_relu = bool(final_relu)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 or self.final_relu:
        x = jax.nn.relu(x)
    return x


class StackedDense(nnx.Module):
  """``n`` dense layers with stacked weights: ``kernel (n, in, out)``, ``bias (n, out)``.

  Call: ``(B, in)`` (the same input for every layer: a plain dense product)
  or ``(B, n, in)`` (one input each: a ``dot_general`` with batch dimension
  ``n``) ``-> (B, n, out)``.
  """

  def __init__(self, n: int, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_init(rngs.params(), (n, in_dim, out_dim), in_dim))
    self.bias = nnx.Param(jnp.zeros((n, out_dim), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    spec = "bi,nio->bno" if x.ndim == 2 else "bni,nio->bno"
    return jnp.einsum(spec, x, self.kernel[...]) + self.bias[...]


class StackedMLP(nnx.Module):
  """``n`` independent MLPs with stacked weights (see :class:`StackedDense`).

  Call: ``(B, in)`` or ``(B, n, in) -> (B, n, sizes[-1])``.
  """

  def __init__(
    self, n: int, in_dim: int, sizes: Sequence[int], *, final_relu: bool, rngs: nnx.Rngs
  ):
    dims = (int(in_dim), *(int(s) for s in sizes))
    self.final_relu = bool(final_relu)
    self.layers = nnx.List([StackedDense(n, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 or self.final_relu:
        x = jax.nn.relu(x)
    return x


class _Group(nnx.Module):
  """``n`` MLPs, stacked (one :class:`StackedMLP`) or separate (``n`` :class:`MLP`).

  Call: ``(B, in)`` (shared input) or ``(B, n, in)`` (one input each) ``->
  (B, n, sizes[-1])``.
  """

  def __init__(
    self,
    n: int,
    in_dim: int,
    sizes: Sequence[int],
    *,
    stacked: bool,
    final_relu: bool,
    rngs: nnx.Rngs,
  ):
    self.stacked = bool(stacked)
    if self.stacked:
      self.mlp = StackedMLP(n, in_dim, sizes, final_relu=final_relu, rngs=rngs)
    else:
      self.mlps = nnx.List([MLP(in_dim, sizes, final_relu=final_relu, rngs=rngs) for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stacked:
      return self.mlp(x)
    if x.ndim == 2:
      return jnp.stack([m(x) for m in self.mlps], axis=1)
    return jnp.stack([m(x[:, i]) for i, m in enumerate(self.mlps)], axis=1)


def _towers(cfg: RecsysConfig, in_dim: int, rngs: nnx.Rngs) -> _Group:
  """One tower per task ending in a 1-unit logit layer."""
  return _Group(
    cfg.num_tasks,
    in_dim,
    (*cfg.tower, 1),
    stacked=cfg.stacked_towers,
    final_relu=False,
    rngs=rngs,
  )


def _gates(n: int, in_dim: int, width: int, stacked: bool, rngs: nnx.Rngs) -> _Group:
  """``n`` linear gates (softmax applied by the caller)."""
  return _Group(n, in_dim, (width,), stacked=stacked, final_relu=False, rngs=rngs)


def _mean_pool(emb: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean over the non-padding positions of ``(B, L, D)`` (zero for an all-padding row)."""
  mask = (ids != PAD).astype(emb.dtype)
  total = jnp.einsum("bld,bl->bd", emb, mask)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]


class Features(nnx.Module):
  """Embedding tables and the feature vector ``(B, cfg.feature_dim)``.

  Call: ``batch`` (a mapping with ``user (B,)``, ``item (B,)``, ``history
  (B, L)``, ``side (B, n_side)`` int ids and ``dense (B, num_dense)``) ->
  ``concat[user, item, mean-pooled history, side embeddings, dense]``.
  """

  def __init__(self, cfg: RecsysConfig, *, rngs: nnx.Rngs):
    self.shared_history = bool(cfg.shared_history)
    self.user = nnx.Embed(cfg.vocab, cfg.embed_dim, rngs=rngs)
    self.item = nnx.Embed(cfg.vocab, cfg.embed_dim, rngs=rngs)
    if not self.shared_history:
      self.history = nnx.Embed(cfg.vocab, cfg.embed_dim, rngs=rngs)
    self.side = nnx.List([nnx.Embed(v, cfg.side_dim, rngs=rngs) for v in cfg.side_vocab])

  def __call__(self, batch: Any) -> jax.Array:
    history_table = self.item if self.shared_history else self.history
    parts = [
      self.user(batch["user"]),
      self.item(batch["item"]),
      _mean_pool(history_table(batch["history"]), batch["history"]),
      *(table(batch["side"][:, j]) for j, table in enumerate(self.side)),
      jnp.asarray(batch["dense"], jnp.float32),
    ]
    return jnp.concatenate(parts, axis=-1)


class SharedBottom(nnx.Module):
  """Features -> shared MLP -> one tower per task. Call: ``batch -> logits (B, T)``."""

  def __init__(self, cfg: RecsysConfig, *, rngs: nnx.Rngs):
    self.features = Features(cfg, rngs=rngs)
    self.bottom = MLP(cfg.feature_dim, cfg.bottom, final_relu=True, rngs=rngs)
    self.towers = _towers(cfg, cfg.bottom[-1], rngs)

  def __call__(self, batch: Any) -> jax.Array:
    h = self.bottom(self.features(batch))
    return self.towers(h)[..., 0]


class MMoE(nnx.Module):
  """Features -> ``n_experts`` shared experts, mixed per task by a softmax gate
  on the features -> one tower per task. Call: ``batch -> logits (B, T)``."""

  def __init__(self, cfg: RecsysConfig, *, rngs: nnx.Rngs):
    d = cfg.feature_dim
    self.features = Features(cfg, rngs=rngs)
    self.experts = _Group(
      cfg.n_experts, d, cfg.expert, stacked=cfg.stacked_experts, final_relu=True, rngs=rngs
    )
    self.gates = _gates(cfg.num_tasks, d, cfg.n_experts, cfg.stacked_towers, rngs)
    self.towers = _towers(cfg, cfg.expert[-1], rngs)

  def __call__(self, batch: Any) -> jax.Array:
    x = self.features(batch)
    experts = self.experts(x)  # (B, E, H)
    gates = jax.nn.softmax(self.gates(x), axis=-1)  # (B, T, E)
    mixed = jnp.einsum("bte,beh->bth", gates, experts)
    return self.towers(mixed)[..., 0]


class _Extraction(nnx.Module):
  """One PLE extraction layer: ``T`` groups of ``n_task_experts`` task experts
  and one group of ``n_experts`` shared experts; task ``t``'s output mixes its
  own and the shared experts with its gate, the shared output (below the last
  layer) mixes all experts with the shared gate.

  Call: ``x (B, D)`` (every group reads the same input: the first layer) or
  ``(B, T + 1, D)`` (task inputs, then the shared input) ``-> (B, T, H)`` if
  ``last`` else ``(B, T + 1, H)``.
  """

  def __init__(self, cfg: RecsysConfig, in_dim: int, *, last: bool, rngs: nnx.Rngs):
    t, nt, ns = cfg.num_tasks, cfg.n_task_experts, cfg.n_experts
    self.num_tasks, self.n_task_experts, self.last = t, nt, bool(last)
    stacked = cfg.stacked_experts
    self.task_experts = _Group(
      t * nt, in_dim, cfg.expert, stacked=stacked, final_relu=True, rngs=rngs
    )
    self.shared_experts = _Group(
      ns, in_dim, cfg.expert, stacked=stacked, final_relu=True, rngs=rngs
    )
    self.task_gates = _gates(t, in_dim, nt + ns, cfg.stacked_towers, rngs)
    if not self.last:
      self.shared_gate = nnx.Linear(in_dim, t * nt + ns, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t, nt = self.num_tasks, self.n_task_experts
    if x.ndim == 2:
      task_in, shared_in = x, x
      task_out = self.task_experts(x)  # (B, T * nt, H)
    else:
      task_in, shared_in = x[:, :t], x[:, t]
      task_out = self.task_experts(jnp.repeat(task_in, nt, axis=1))
    shared_out = self.shared_experts(shared_in)  # (B, ns, H)
    b, h = task_out.shape[0], task_out.shape[-1]
    own = task_out.reshape(b, t, nt, h)
    shared = jnp.broadcast_to(shared_out[:, None], (b, t, *shared_out.shape[1:]))
    candidates = jnp.concatenate([own, shared], axis=2)  # (B, T, nt + ns, H)
    gates = jax.nn.softmax(self.task_gates(task_in), axis=-1)  # (B, T, nt + ns)
    out = jnp.einsum("btn,btnh->bth", gates, candidates)
    if self.last:
      return out
    every = jnp.concatenate([task_out, shared_out], axis=1)  # (B, T * nt + ns, H)
    sgate = jax.nn.softmax(self.shared_gate(shared_in), axis=-1)
    shared_mix = jnp.einsum("bn,bnh->bh", sgate, every)
    return jnp.concatenate([out, shared_mix[:, None]], axis=1)


class PLE(nnx.Module):
  """Features -> ``n_levels`` extraction layers -> one tower per task.
  Call: ``batch -> logits (B, T)``."""

  def __init__(self, cfg: RecsysConfig, *, rngs: nnx.Rngs):
    self.features = Features(cfg, rngs=rngs)
    dims = [cfg.feature_dim] + [cfg.expert[-1]] * (cfg.n_levels - 1)
    self.levels = nnx.List(
      [_Extraction(cfg, d, last=(i == cfg.n_levels - 1), rngs=rngs) for i, d in enumerate(dims)]
    )
    self.towers = _towers(cfg, cfg.expert[-1], rngs)

  def __call__(self, batch: Any) -> jax.Array:
    x = self.features(batch)
    for level in self.levels:
      x = level(x)
    return self.towers(x)[..., 0]


_CLASSES = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}


def init(cfg: RecsysConfig, seed: int = 0) -> tuple[nnx.GraphDef, Any]:
  """``(graphdef, params)`` of the model of ``cfg``, with the initial values
  drawn on the host by NumPy (fast for large tables, nothing compiled).

  The model is built abstractly (``nnx.eval_shape``), then every parameter
  is drawn from ``seed`` by :func:`draw_params`.
  """
  cls = _CLASSES[cfg.model]
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  return graphdef, draw_params(abstract, seed)


def draw_params(abstract: Any, seed: int) -> Any:
  """Initial values of an abstract parameter state (``nnx.split`` of an
  ``nnx.eval_shape``-built model), drawn on the host by NumPy from ``seed``:
  embedding tables ``N(0, 1 / width)`` (the variance of ``nnx.Embed``'s
  default), kernels ``(..., fan_in, fan_out)`` truncated normal (+-2 std) of
  variance ``1 / fan_in`` (LeCun, ``nnx.Linear``'s default), biases zero.
  Leaves are visited in the pytree's order."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    kind = next(n for n in reversed(names) if n in ("embedding", "kernel", "bias"))
    shape = tuple(leaf.shape)
    if kind == "bias":
      value = np.zeros(shape, np.float32)
    elif kind == "embedding":
      value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    else:
      value = rng.standard_normal(shape, dtype=np.float32)
      bad = np.abs(value) > 2.0
      while bad.any():
        value[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(value) > 2.0
      value *= np.float32(1.0 / (0.8796256610342398 * np.sqrt(shape[-2])))
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def make_model(cfg: RecsysConfig, seed: int = 0) -> nnx.Module:
  """The model of ``cfg.model`` with the parameters of :func:`init`."""
  return nnx.merge(*init(cfg, seed))


def num_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------- losses


def make_logits_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any], jax.Array]:
  """``fn(params, batch) -> logits (B, T)`` for ``graphdef, params = nnx.split(model)``."""

  def logits_fn(params: Any, batch: Any) -> jax.Array:
    return nnx.merge(graphdef, params)(batch)

  return logits_fn


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any], jax.Array]:
  """``fn(params, batch) -> (T,)``: each task's mean binary cross-entropy
  (``optax.sigmoid_binary_cross_entropy`` of the logits and ``batch["labels"]
  (B, T)``), for ``graphdef, params = nnx.split(model)``."""
  logits_fn = make_logits_fn(graphdef)

  def loss_fn(params: Any, batch: Any) -> jax.Array:
    logits = logits_fn(params, batch)
    labels = jnp.asarray(batch["labels"], logits.dtype)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=0)

  return loss_fn


# --------------------------------------------------------------------- data


def _zipf_ids(rng: np.random.Generator, shape: Sequence[int], low: int, high: int) -> np.ndarray:
  """Ids in ``[low, high)`` with ``P(low + k)`` roughly proportional to
  ``1 / (k + 1)`` (log-uniform): a few ids are very frequent, most are rare."""
  n = high - low
  k = np.floor(np.exp(rng.random(tuple(shape)) * np.log(n + 1.0))).astype(np.int64) - 1
  return (low + np.clip(k, 0, n - 1)).astype(np.int32)


def _hash_latent(ids: np.ndarray, salt: int) -> np.ndarray:
  """``(..., K)`` pseudo-random factors of unit variance, a fixed function of
  the id (an integer hash: no table of ``vocab`` rows)."""
  k = np.arange(_LATENT, dtype=np.uint32)
  offset = np.uint32((salt * 0xC2B2AE3D) & 0xFFFFFFFF)
  h = ids.astype(np.uint32)[..., None] * np.uint32(0x9E3779B1) + (
    k * np.uint32(0x85EBCA77) + offset
  )
  h ^= h >> np.uint32(15)
  h *= np.uint32(0x2C1B3C6D)
  h ^= h >> np.uint32(12)
  h *= np.uint32(0x297A2D39)
  h ^= h >> np.uint32(15)
  u = (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)
  return (u - np.float32(0.5)) * np.float32(np.sqrt(12.0))


def _key_rng(key: Any) -> np.random.Generator:
  """A NumPy generator seeded by a JAX PRNG key (or an int)."""
  if isinstance(key, (int, np.integer)):
    return np.random.default_rng(int(key))
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def make_batch_fn(cfg: RecsysConfig, teacher_seed: int = 1234) -> Callable[[Any, int], dict]:
  """``batch_fn(key, batch_size) -> batch`` of JAX arrays.

  Drawn on the host with NumPy, seeded by ``key`` (a JAX PRNG key or an int):
  the same key gives the same batch, and nothing is compiled.

  The batch: ``user (B,)`` in ``[0, vocab)`` and ``item (B,)`` in ``[1,
  vocab)``, both Zipf-like; ``history (B, L)``: ``n ~ U{0..L}`` Zipf-like item
  ids then padding ``0``; ``side (B, n_side)`` uniform; ``dense (B,
  num_dense)`` standard normal (all int32 / float32); ``labels (B, T)`` float
  0/1 drawn from ``sigmoid(2 * teacher logits)``. The teacher (fixed by
  ``teacher_seed``, the same for every batch) scores the user-item and
  history-item affinities of hashed latent factors, the side features and
  the dense features with task weights that share a common part, so the
  tasks are related but not identical.
  """
  t, k, n_dense = cfg.num_tasks, _LATENT, cfg.num_dense
  n_side = len(cfg.side_vocab)
  teacher = np.random.default_rng(teacher_seed)
  common = teacher.standard_normal((3, k))

  def task_weights(i, width):
    shared = np.resize(common[i], width)
    return ((shared + teacher.standard_normal((t, width))) / np.sqrt(2.0 * width)).astype(
      np.float32
    )

  w_ui, w_hi, w_side = (task_weights(i, k) for i in range(3))
  w_dense = task_weights(2, n_dense) if n_dense else np.zeros((t, 0), np.float32)
  bias = np.linspace(-1.5, 0.0, t, dtype=np.float32)

  def batch_fn(key: Any, batch_size: int) -> dict:
    b, length = int(batch_size), cfg.history_len
    rng = _key_rng(key)
    user = _zipf_ids(rng, (b,), 0, cfg.vocab)
    item = _zipf_ids(rng, (b,), 1, cfg.vocab)
    hist = _zipf_ids(rng, (b, length), 1, cfg.vocab)
    n_valid = rng.integers(0, length + 1, size=(b, 1))
    hist = np.where(np.arange(length)[None, :] < n_valid, hist, PAD).astype(np.int32)
    side = np.stack(
      [rng.integers(0, v, size=b) for v in cfg.side_vocab] or [np.zeros(b, np.int64)], axis=1
    )[:, :n_side].astype(np.int32)
    dense = rng.standard_normal((b, n_dense), dtype=np.float32)

    f_item = _hash_latent(item, 2)
    mask = (hist != PAD).astype(np.float32)[..., None]
    f_hist = np.sum(_hash_latent(hist, 2) * mask, 1) / np.maximum(np.sum(mask, 1), 1.0)
    f_side = sum((_hash_latent(side[:, j], 3 + j) for j in range(n_side)), np.zeros((b, k)))
    logits = (
      1.5 * (_hash_latent(user, 1) * f_item) @ w_ui.T
      + 1.5 * (f_hist * f_item) @ w_hi.T
      + f_side / np.sqrt(max(n_side, 1)) @ w_side.T
      + dense @ w_dense.T
      + bias
    )
    labels = (rng.random((b, t)) < 1.0 / (1.0 + np.exp(-2.0 * logits))).astype(np.float32)
    out = dict(user=user, item=item, history=hist, side=side, dense=dense, labels=labels)
    return {name: jnp.asarray(value) for name, value in out.items()}

  return batch_fn


def build(
  cfg: RecsysConfig, seed: int = 0
) -> tuple[Callable[[Any, Any], jax.Array], Any, Callable[[jax.Array, int], Any]]:
  """``(loss_fn, params, batch_fn)`` of a model, for plain JAX use.

  Args:
    cfg: the model's sizes.
    seed: seed of the initial parameters.

  Returns:
    ``loss_fn(params, batch) -> (T,)`` per-task losses (pure: the model is
    ``nnx.merge(graphdef, params)``); ``params``, the ``nnx.State`` of the
    model's parameters from ``nnx.split`` (a pytree: differentiate it, hand
    it to optax); ``batch_fn(key, batch_size)``, see :func:`make_batch_fn`.
  """
  graphdef, params = init(cfg, seed)
  return make_loss_fn(graphdef), params, make_batch_fn(cfg)


def auc(labels: Any, scores: Any) -> np.ndarray:
  """Per-column ROC AUC of ``(n, T)`` 0/1 labels and scores (rank-sum
  statistic, ties counted 1/2); ``nan`` where a column has one class only."""
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  out = []
  for t in range(labels.shape[1]):
    pos = labels[:, t].astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
      out.append(float("nan"))
      continue
    _, inverse, counts = np.unique(scores[:, t], return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_rank[inverse.reshape(-1)]
    out.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
  return np.asarray(out)
