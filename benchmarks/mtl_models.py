"""Multi-task models (Flax NNX) for tabular data such as Census-Income.

Three classic architectures, all over the same :class:`FeatureEmbedding`
(an embedding per categorical column, concatenated with the numeric
features) and all returning one logit per task, ``model(cat, num) -> (B, T)``:

* :class:`SharedBottom` -- shared MLP, then one MLP tower per task;
* :class:`MMoE` -- multi-gate mixture of experts (Ma et al., KDD 2018);
* :class:`PLE` -- progressive layered extraction (Tang et al., RecSys 2020),
  with shared and task-specific experts in ``n_levels`` extraction layers.

Every model also exposes ``representation(cat, num) -> z`` and ``head(z) ->
logits`` with ``model(cat, num) == model.head(model.representation(cat, num))``.
For :class:`SharedBottom` ``z`` is the output of the shared bottom ``(B, H)``;
for :class:`MMoE` and :class:`PLE` (whose gates see the input) it is the
embedded input ``(B, D)``, the last representation every task shares.

The models hold only :class:`flax.nnx.Param` variables (no dropout, no batch
norm), so ``graphdef, params = nnx.split(model)`` and
:func:`make_loss_fn` give a pure ``fn(params, batch) -> (T,)`` usable with
``jax.jacrev`` or a ``vmap`` of ``vjp`` for per-task gradients.

Also here: :func:`bce_task_losses`, :func:`auc` (ROC AUC via ranks) and
:func:`evaluate_auc`.

This is a plain module used by the benchmarks, the examples and the tests
(``sys.path`` must include ``benchmarks/``); it is not part of the
``gradcraft_jax`` package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
  "FeatureEmbedding",
  "StackedMLP",
  "SharedBottom",
  "MMoE",
  "PLE",
  "MODELS",
  "representation",
  "bce_task_losses",
  "make_loss_fn",
  "make_predict_fn",
  "auc",
  "evaluate_auc",
]

_BLOCK = 4096
_TRUNC_STD = 0.8796256610342398  # std of a standard normal truncated to [-2, 2]


def _truncated_normal(key: jax.Array, shape: Sequence[int], std: float) -> jax.Array:
  """Truncated-normal (+-2 std) init drawn in fixed-size blocks.

  Same distribution as ``variance_scaling(..., "truncated_normal")``, but every
  parameter is cut from ``(4096,)`` draws, so eager model construction compiles
  one random kernel instead of one per parameter shape (seconds on CPU).
  Gives the same values eagerly and under ``jax.jit`` / ``nnx.eval_shape``.
  """
  shape = tuple(int(s) for s in shape)
  size = int(np.prod(shape))
  blocks = [
    jax.random.truncated_normal(jax.random.fold_in(key, i), -2.0, 2.0, (_BLOCK,), jnp.float32)
    for i in range(max(1, -(-size // _BLOCK)))
  ]
  try:
    flat = np.concatenate([np.asarray(b) for b in blocks])
    xp = np
  except jax.errors.TracerArrayConversionError:
    flat = jnp.concatenate(blocks)
    xp = jnp
  out = xp.reshape(flat[:size], shape) * xp.float32(std / _TRUNC_STD)
  return jnp.asarray(out, jnp.float32)


def _kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """LeCun truncated-normal init for kernels ``(..., fan_in, fan_out)``."""
  return _truncated_normal(key, shape, 1.0 / np.sqrt(shape[-2])).astype(dtype)


def _get(batch: Any, key: str):
  return batch[key] if isinstance(batch, Mapping) else getattr(batch, key)


class FeatureEmbedding(nnx.Module):
  """Embeds categorical columns and concatenates the numeric features.

  One ``(cardinality_i, embed_dim)`` table per categorical column; the tables
  are stored as disjoint row blocks of a single ``(sum(cardinalities),
  embed_dim)`` parameter (one gather instead of ``n_cat``), which is
  mathematically the same as separate tables.

  Args:
    cardinalities: number of ids per categorical column (ids in ``[0, c)``).
    num_numeric: number of numeric columns.
    embed_dim: embedding size per column.
    rngs: ``nnx.Rngs``.

  Call: ``(cat int (B, n_cat), num float (B, n_num)) -> (B, n_cat * embed_dim + n_num)``.
  """

  def __init__(
    self, cardinalities: Sequence[int], num_numeric: int, embed_dim: int, *, rngs: nnx.Rngs
  ):
    cardinalities = tuple(int(c) for c in cardinalities)
    self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(cardinalities)[:-1]]))
    self.num_numeric = int(num_numeric)
    self.out_dim = len(cardinalities) * embed_dim + self.num_numeric
    shape = (int(sum(cardinalities)), int(embed_dim))
    self.table = nnx.Param(_truncated_normal(rngs.params(), shape, 1.0 / np.sqrt(embed_dim)))

  def __call__(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    ids = jnp.asarray(cat, jnp.int32) + jnp.asarray(self.offsets, jnp.int32)
    emb = jnp.take(self.table[...], ids, axis=0)  # (B, n_cat, E)
    emb = emb.reshape(emb.shape[0], -1)
    return jnp.concatenate([emb, jnp.asarray(num, jnp.float32)], axis=-1)


class StackedMLP(nnx.Module):
  """``n`` independent MLPs evaluated together with batched weights.

  Args:
    n: number of MLPs (experts or towers).
    in_dim: input size.
    sizes: output sizes of the layers, e.g. ``(64, 32)``.
    final_activation: apply the ReLU after the last layer too.
    rngs: ``nnx.Rngs``.

  Call: ``x`` of shape ``(B, in_dim)`` (the same input for every MLP) or
  ``(B, n, in_dim)`` (one input each) ``-> (B, n, sizes[-1])``.
  """

  def __init__(
    self,
    n: int,
    in_dim: int,
    sizes: Sequence[int],
    *,
    final_activation: bool = True,
    rngs: nnx.Rngs,
  ):
    self.final_activation = bool(final_activation)
    dims = (int(in_dim),) + tuple(int(s) for s in sizes)
    self.kernels = nnx.List(
      [
        nnx.Param(_kernel_init(rngs.params(), (n, a, b), jnp.float32))
        for a, b in zip(dims[:-1], dims[1:])
      ]
    )
    self.biases = nnx.List([nnx.Param(jnp.zeros((n, b), jnp.float32)) for b in dims[1:]])

  def __call__(self, x: jax.Array) -> jax.Array:
    n_layers = len(self.kernels)
    for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
      if i == 0 and x.ndim == 2:
        x = jnp.einsum("bi,eio->beo", x, w[...]) + b[...]
      else:
        x = jnp.einsum("bei,eio->beo", x, w[...]) + b[...]
      if i < n_layers - 1 or self.final_activation:
        x = jax.nn.relu(x)
    return x


class _Towers(nnx.Module):
  """One MLP tower per task ending in a single logit: ``(B, d) | (B, T, d) -> (B, T)``."""

  def __init__(self, num_tasks: int, in_dim: int, tower_sizes: Sequence[int], *, rngs: nnx.Rngs):
    self.mlp = StackedMLP(
      num_tasks, in_dim, tuple(tower_sizes) + (1,), final_activation=False, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(x)[..., 0]


class SharedBottom(nnx.Module):
  """Shared-bottom multi-task network.

  Args:
    cardinalities: ids per categorical column.
    num_numeric: number of numeric features.
    num_tasks: number of tasks ``T``.
    embed_dim: embedding size per categorical column.
    bottom_sizes: layer sizes of the shared MLP.
    tower_sizes: hidden layer sizes of each task tower (a final 1-unit layer is added).
    rngs: ``nnx.Rngs``, e.g. ``nnx.Rngs(0)``.

  Call: ``(cat (B, n_cat), num (B, n_num)) -> logits (B, T)``.
  """

  def __init__(
    self,
    cardinalities: Sequence[int],
    num_numeric: int,
    num_tasks: int,
    *,
    embed_dim: int = 6,
    bottom_sizes: Sequence[int] = (128, 64),
    tower_sizes: Sequence[int] = (32,),
    rngs: nnx.Rngs,
  ):
    self.num_tasks = int(num_tasks)
    self.embedding = FeatureEmbedding(cardinalities, num_numeric, embed_dim, rngs=rngs)
    self.bottom = StackedMLP(1, self.embedding.out_dim, bottom_sizes, rngs=rngs)
    self.towers = _Towers(num_tasks, int(bottom_sizes[-1]), tower_sizes, rngs=rngs)

  def representation(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    """Shared-bottom output ``(B, bottom_sizes[-1])``."""
    return self.bottom(self.embedding(cat, num))[:, 0]

  def head(self, z: jax.Array) -> jax.Array:
    """Task towers: ``(B, H) -> logits (B, T)``."""
    return self.towers(z)

  def __call__(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    return self.head(self.representation(cat, num))


class MMoE(nnx.Module):
  """Multi-gate mixture-of-experts network.

  Args:
    cardinalities: ids per categorical column.
    num_numeric: number of numeric features.
    num_tasks: number of tasks ``T``.
    embed_dim: embedding size per categorical column.
    n_experts: number of shared experts.
    expert_sizes: layer sizes of each expert MLP.
    tower_sizes: hidden layer sizes of each task tower.
    rngs: ``nnx.Rngs``.

  Each task ``t`` mixes the expert outputs with a softmax gate computed from
  the embedded input. Call: ``(cat, num) -> logits (B, T)``.
  """

  def __init__(
    self,
    cardinalities: Sequence[int],
    num_numeric: int,
    num_tasks: int,
    *,
    embed_dim: int = 6,
    n_experts: int = 4,
    expert_sizes: Sequence[int] = (64, 32),
    tower_sizes: Sequence[int] = (32,),
    rngs: nnx.Rngs,
  ):
    self.num_tasks = int(num_tasks)
    self.embedding = FeatureEmbedding(cardinalities, num_numeric, embed_dim, rngs=rngs)
    d = self.embedding.out_dim
    self.experts = StackedMLP(n_experts, d, expert_sizes, rngs=rngs)
    self.gate_w = nnx.Param(_kernel_init(rngs.params(), (num_tasks, d, n_experts), jnp.float32))
    self.gate_b = nnx.Param(jnp.zeros((num_tasks, n_experts), jnp.float32))
    self.towers = _Towers(num_tasks, int(expert_sizes[-1]), tower_sizes, rngs=rngs)

  def representation(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    """Embedded input ``(B, D)`` (the gates depend on it, so it is the shared representation)."""
    return self.embedding(cat, num)

  def gates(self, z: jax.Array) -> jax.Array:
    """Gate weights ``(B, T, n_experts)`` (rows sum to 1)."""
    return jax.nn.softmax(
      jnp.einsum("bd,tde->bte", z, self.gate_w[...]) + self.gate_b[...], axis=-1
    )

  def head(self, z: jax.Array) -> jax.Array:
    """Experts, gates and towers: ``(B, D) -> logits (B, T)``."""
    experts = self.experts(z)  # (B, E, H)
    mixed = jnp.einsum("bte,beh->bth", self.gates(z), experts)
    return self.towers(mixed)

  def __call__(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    return self.head(self.representation(cat, num))


class _ExtractionLayer(nnx.Module):
  """One PLE extraction layer over ``T + 1`` inputs (T task inputs + 1 shared)."""

  def __init__(
    self,
    num_tasks: int,
    in_dim: int,
    n_shared: int,
    n_task: int,
    expert_sizes: Sequence[int],
    *,
    last: bool,
    rngs: nnx.Rngs,
  ):
    T = int(num_tasks)
    self.last = bool(last)
    n_total = T * n_task + n_shared
    # Expert e belongs to group owner[e]: task t (0..T-1) or the shared group T.
    self.owner = tuple([t for t in range(T) for _ in range(n_task)] + [T] * n_shared)
    shared_ids = list(range(T * n_task, n_total))
    self.task_select = tuple(
      tuple(list(range(t * n_task, (t + 1) * n_task)) + shared_ids) for t in range(T)
    )
    self.experts = StackedMLP(n_total, in_dim, expert_sizes, rngs=rngs)
    n_sel = n_task + n_shared
    self.gate_w = nnx.Param(_kernel_init(rngs.params(), (T, in_dim, n_sel), jnp.float32))
    self.gate_b = nnx.Param(jnp.zeros((T, n_sel), jnp.float32))
    if not self.last:
      self.shared_gate_w = nnx.Param(_kernel_init(rngs.params(), (1, in_dim, n_total), jnp.float32))
      self.shared_gate_b = nnx.Param(jnp.zeros((1, n_total), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (B, T + 1, D)``, or ``(B, D)`` when every group reads the same input
    (the first layer; same result, one plain matmul per expert layer) ->
    ``(B, T, H)`` if last else ``(B, T + 1, H)``."""
    T = len(self.task_select)
    if x.ndim == 2:
      out = self.experts(x)  # (B, E, H)
      x = jnp.broadcast_to(x[:, None], (x.shape[0], T + 1, x.shape[1]))
    else:
      out = self.experts(x[:, jnp.asarray(self.owner)])  # (B, E, D) -> (B, E, H)
    gate = jax.nn.softmax(
      jnp.einsum("btd,tdn->btn", x[:, :T], self.gate_w[...]) + self.gate_b[...], axis=-1
    )
    selected = out[:, jnp.asarray(self.task_select)]  # (B, T, n_sel, H)
    task_out = jnp.einsum("btn,btnh->bth", gate, selected)
    if self.last:
      return task_out
    sgate = jax.nn.softmax(
      jnp.einsum("bd,de->be", x[:, T], self.shared_gate_w[...][0]) + self.shared_gate_b[...][0],
      axis=-1,
    )
    shared_out = jnp.einsum("be,beh->bh", sgate, out)
    return jnp.concatenate([task_out, shared_out[:, None]], axis=1)


class PLE(nnx.Module):
  """Progressive layered extraction (customised gate control when ``n_levels == 1``).

  Args:
    cardinalities: ids per categorical column.
    num_numeric: number of numeric features.
    num_tasks: number of tasks ``T``.
    embed_dim: embedding size per categorical column.
    n_experts: number of shared experts per extraction layer.
    n_task_experts: number of task-specific experts per task and layer.
    expert_sizes: layer sizes of each expert MLP.
    n_levels: number of extraction layers.
    tower_sizes: hidden layer sizes of each task tower.
    rngs: ``nnx.Rngs``.

  Call: ``(cat, num) -> logits (B, T)``.
  """

  def __init__(
    self,
    cardinalities: Sequence[int],
    num_numeric: int,
    num_tasks: int,
    *,
    embed_dim: int = 6,
    n_experts: int = 2,
    n_task_experts: int = 1,
    expert_sizes: Sequence[int] = (64, 32),
    n_levels: int = 2,
    tower_sizes: Sequence[int] = (32,),
    rngs: nnx.Rngs,
  ):
    if n_levels < 1:
      raise ValueError("n_levels must be >= 1")
    self.num_tasks = int(num_tasks)
    self.embedding = FeatureEmbedding(cardinalities, num_numeric, embed_dim, rngs=rngs)
    dims = [self.embedding.out_dim] + [int(expert_sizes[-1])] * (n_levels - 1)
    self.levels = nnx.List(
      [
        _ExtractionLayer(
          num_tasks, d, n_experts, n_task_experts, expert_sizes, last=(i == n_levels - 1), rngs=rngs
        )
        for i, d in enumerate(dims)
      ]
    )
    self.towers = _Towers(num_tasks, int(expert_sizes[-1]), tower_sizes, rngs=rngs)

  def representation(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    """Embedded input ``(B, D)``."""
    return self.embedding(cat, num)

  def head(self, z: jax.Array) -> jax.Array:
    """Extraction layers and towers: ``(B, D) -> logits (B, T)``."""
    x = z  # every group of the first layer reads the embedded input
    for level in self.levels:
      x = level(x)
    return self.towers(x)

  def __call__(self, cat: jax.Array, num: jax.Array) -> jax.Array:
    return self.head(self.representation(cat, num))


MODELS: dict[str, type] = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}


def representation(model: nnx.Module, cat: jax.Array, num: jax.Array) -> jax.Array:
  """Shared representation ``z`` of a model, with ``model.head(z) == model(cat, num)``.

  Args:
    model: a :class:`SharedBottom`, :class:`MMoE` or :class:`PLE`.
    cat: int ``(B, n_cat)``; num: float ``(B, n_num)``.

  Returns:
    ``(B, H)``: the bottom output for SharedBottom, the embedded input for MMoE/PLE.
  """
  return model.representation(cat, num)


def bce_task_losses(model: nnx.Module, batch: Any) -> jax.Array:
  """Per-task mean binary cross-entropy.

  Args:
    model: maps ``(cat (B, n_cat), num (B, n_num))`` to logits ``(B, T)``.
    batch: a mapping (or object with attributes) ``cat``, ``num``, ``labels (B, T)``.

  Returns:
    ``(T,)`` float32, the mean over the batch of
    ``optax.sigmoid_binary_cross_entropy`` for each task.
  """
  logits = model(_get(batch, "cat"), _get(batch, "num"))
  labels = jnp.asarray(_get(batch, "labels"), logits.dtype)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=0)


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any], jax.Array]:
  """Pure per-task loss function for ``graphdef, params = nnx.split(model)``.

  Args:
    graphdef: the graph definition from ``nnx.split(model)``.

  Returns:
    ``fn(params, batch) -> (T,)`` per-task mean BCE losses; ``params`` is the
    state from ``nnx.split`` (any pytree of the same structure, e.g. an
    optax update target). Differentiable w.r.t. ``params``, e.g.
    ``jax.jacrev(fn)(params, batch)`` gives per-task gradients with a leading
    ``T`` axis.
  """

  def loss_fn(params: Any, batch: Any) -> jax.Array:
    return bce_task_losses(nnx.merge(graphdef, params), batch)

  return loss_fn


def make_predict_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """Jitted ``fn(params, cat, num) -> logits (B, T)`` for ``graphdef, params = nnx.split(model)``."""

  @jax.jit
  def predict(params: Any, cat: jax.Array, num: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(cat, num)

  return predict


def auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray | float:
  """ROC AUC via the rank-sum (Mann-Whitney U) statistic, ties counted as 1/2.

  Args:
    labels: 0/1 array ``(n,)`` or ``(n, T)``.
    scores: real array of the same shape (higher = more positive).

  Returns:
    A float for 1-D input, a ``(T,)`` array for 2-D input (column-wise).
    ``nan`` where a column has no positive or no negative label.
  """
  labels, scores = np.asarray(labels), np.asarray(scores)
  if labels.shape != scores.shape:
    raise ValueError(f"shape mismatch: labels {labels.shape}, scores {scores.shape}")
  if labels.ndim == 2:
    return np.asarray([auc(labels[:, t], scores[:, t]) for t in range(labels.shape[1])])
  pos = labels.astype(bool)
  n_pos = int(pos.sum())
  n_neg = pos.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores.astype(np.float64), return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
  mean_rank = ends - (counts - 1) / 2.0
  ranks = mean_rank[inverse.reshape(-1)]
  u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def evaluate_auc(model: nnx.Module, split: Any, *, batch_size: int = 8192) -> np.ndarray:
  """Per-task ROC AUC of a model on a whole split.

  Args:
    model: multi-task model, ``(cat, num) -> logits (B, T)``.
    split: mapping or object with ``cat``, ``num``, ``labels (n, T)``.
    batch_size: rows per forward pass.

  Returns:
    ``(T,)`` numpy array of AUCs.
  """
  graphdef, params = nnx.split(model)
  predict = make_predict_fn(graphdef)
  cat, num, labels = (np.asarray(_get(split, k)) for k in ("cat", "num", "labels"))
  outs = [
    np.asarray(predict(params, cat[i : i + batch_size], num[i : i + batch_size]))
    for i in range(0, len(labels), batch_size)
  ]
  return auc(labels, np.concatenate(outs, axis=0))
