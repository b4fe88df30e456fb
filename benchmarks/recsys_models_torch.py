"""The ranking models of ``recsys_models.py`` in PyTorch, with the same weights.

:func:`torch_model` builds the PyTorch twin of a :class:`recsys_models.RecsysConfig`
model (``nn.Embedding`` tables, ``nn.Linear`` layers, stacked weights as
modules of their own applied with ``torch.einsum``) and copies the values of
the JAX parameters into it, so that both compute the same task losses on the
same batch (:func:`max_loss_difference` checks it). Every parameter lives in a
leaf module called by its parent (``nn.Embedding``, ``nn.Linear``,
:class:`StackedDense`), as torchjd's ``autogram.Engine`` requires.

``model(batch) -> (T,)`` per-task mean binary cross-entropy, where ``batch``
is :func:`to_torch` of a batch of ``recsys_models.make_batch_fn``.

A plain module used by the benchmarks and the tests (``sys.path`` must include
``benchmarks/``); not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import recsys_models as rm
import torch
from flax import nnx
from torch import nn

__all__ = ["StackedDense", "Ranking", "torch_model", "twin", "to_torch", "max_loss_difference"]


class StackedDense(nn.Module):
  """``n`` dense layers with stacked weights ``weight (n, in, out)``, ``bias (n, out)``.

  Call: ``(B, in)`` or ``(B, n, in) -> (B, n, out)``.
  """

  def __init__(self, n: int, in_dim: int, out_dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(n, in_dim, out_dim))
    self.bias = nn.Parameter(torch.zeros(n, out_dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    spec = "bi,nio->bno" if x.dim() == 2 else "bni,nio->bno"
    return torch.einsum(spec, x, self.weight) + self.bias


class MLP(nn.Module):
  def __init__(self, in_dim, sizes, *, final_relu):
    super().__init__()
    dims = (int(in_dim), *(int(s) for s in sizes))
    self.final_relu = bool(final_relu)
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 or self.final_relu:
        x = torch.relu(x)
    return x


class StackedMLP(nn.Module):
  def __init__(self, n, in_dim, sizes, *, final_relu):
    super().__init__()
    dims = (int(in_dim), *(int(s) for s in sizes))
    self.final_relu = bool(final_relu)
    self.layers = nn.ModuleList(StackedDense(n, a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1 or self.final_relu:
        x = torch.relu(x)
    return x


class Group(nn.Module):
  def __init__(self, n, in_dim, sizes, *, stacked, final_relu):
    super().__init__()
    self.stacked = bool(stacked)
    if self.stacked:
      self.mlp = StackedMLP(n, in_dim, sizes, final_relu=final_relu)
    else:
      self.mlps = nn.ModuleList(MLP(in_dim, sizes, final_relu=final_relu) for _ in range(n))

  def forward(self, x):
    if self.stacked:
      return self.mlp(x)
    if x.dim() == 2:
      return torch.stack([m(x) for m in self.mlps], dim=1)
    return torch.stack([m(x[:, i]) for i, m in enumerate(self.mlps)], dim=1)


def _towers(cfg, in_dim):
  return Group(cfg.num_tasks, in_dim, (*cfg.tower, 1), stacked=cfg.stacked_towers, final_relu=False)


def _gates(n, in_dim, width, stacked):
  return Group(n, in_dim, (width,), stacked=stacked, final_relu=False)


class Features(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.shared_history = bool(cfg.shared_history)
    self.user = nn.Embedding(cfg.vocab, cfg.embed_dim)
    self.item = nn.Embedding(cfg.vocab, cfg.embed_dim)
    if not self.shared_history:
      self.history = nn.Embedding(cfg.vocab, cfg.embed_dim)
    self.side = nn.ModuleList(nn.Embedding(v, cfg.side_dim) for v in cfg.side_vocab)

  def forward(self, batch):
    history_table = self.item if self.shared_history else self.history
    hist = batch["history"]
    mask = (hist != rm.PAD).to(torch.float32)
    pooled = torch.einsum("bld,bl->bd", history_table(hist), mask)
    pooled = pooled / torch.clamp(mask.sum(dim=1), min=1.0)[:, None]
    parts = [
      self.user(batch["user"]),
      self.item(batch["item"]),
      pooled,
      *(table(batch["side"][:, j]) for j, table in enumerate(self.side)),
      batch["dense"],
    ]
    return torch.cat(parts, dim=-1)


class SharedBottom(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.features = Features(cfg)
    self.bottom = MLP(cfg.feature_dim, cfg.bottom, final_relu=True)
    self.towers = _towers(cfg, cfg.bottom[-1])

  def forward(self, batch):
    return self.towers(self.bottom(self.features(batch)))[..., 0]


class MMoE(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d = cfg.feature_dim
    self.features = Features(cfg)
    self.experts = Group(cfg.n_experts, d, cfg.expert, stacked=cfg.stacked_experts, final_relu=True)
    self.gates = _gates(cfg.num_tasks, d, cfg.n_experts, cfg.stacked_towers)
    self.towers = _towers(cfg, cfg.expert[-1])

  def forward(self, batch):
    x = self.features(batch)
    experts = self.experts(x)
    gates = torch.softmax(self.gates(x), dim=-1)
    mixed = torch.einsum("bte,beh->bth", gates, experts)
    return self.towers(mixed)[..., 0]


class Extraction(nn.Module):
  def __init__(self, cfg, in_dim, *, last):
    super().__init__()
    t, nt, ns = cfg.num_tasks, cfg.n_task_experts, cfg.n_experts
    self.num_tasks, self.n_task_experts, self.last = t, nt, bool(last)
    stacked = cfg.stacked_experts
    self.task_experts = Group(t * nt, in_dim, cfg.expert, stacked=stacked, final_relu=True)
    self.shared_experts = Group(ns, in_dim, cfg.expert, stacked=stacked, final_relu=True)
    self.task_gates = _gates(t, in_dim, nt + ns, cfg.stacked_towers)
    if not self.last:
      self.shared_gate = nn.Linear(in_dim, t * nt + ns)

  def forward(self, x):
    t, nt = self.num_tasks, self.n_task_experts
    if x.dim() == 2:
      task_in, shared_in = x, x
      task_out = self.task_experts(x)
    else:
      task_in, shared_in = x[:, :t], x[:, t]
      task_out = self.task_experts(torch.repeat_interleave(task_in, nt, dim=1))
    shared_out = self.shared_experts(shared_in)
    b, h = task_out.shape[0], task_out.shape[-1]
    own = task_out.reshape(b, t, nt, h)
    shared = shared_out[:, None].expand(b, t, *shared_out.shape[1:])
    candidates = torch.cat([own, shared], dim=2)
    gates = torch.softmax(self.task_gates(task_in), dim=-1)
    out = torch.einsum("btn,btnh->bth", gates, candidates)
    if self.last:
      return out
    every = torch.cat([task_out, shared_out], dim=1)
    sgate = torch.softmax(self.shared_gate(shared_in), dim=-1)
    shared_mix = torch.einsum("bn,bnh->bh", sgate, every)
    return torch.cat([out, shared_mix[:, None]], dim=1)


class PLE(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.features = Features(cfg)
    dims = [cfg.feature_dim] + [cfg.expert[-1]] * (cfg.n_levels - 1)
    self.levels = nn.ModuleList(
      Extraction(cfg, d, last=(i == cfg.n_levels - 1)) for i, d in enumerate(dims)
    )
    self.towers = _towers(cfg, cfg.expert[-1])

  def forward(self, batch):
    x = self.features(batch)
    for level in self.levels:
      x = level(x)
    return self.towers(x)[..., 0]


class Ranking(nn.Module):
  """``batch -> (T,)``: each task's mean BCE of the network's logits."""

  def __init__(self, net: nn.Module, cfg: rm.RecsysConfig):
    super().__init__()
    self.net = net
    self.cfg = cfg

  def forward(self, batch):
    logits = self.net(batch)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none")
    return bce.mean(dim=0)


_CLASSES = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}

# JAX leaf name(s) of each PyTorch parameter, per module type, and how the value maps.
_COPY = {
  nn.Linear: {"weight": ("kernel", np.transpose), "bias": ("bias", None)},
  nn.Embedding: {"weight": ("embedding", None)},
  StackedDense: {"weight": ("kernel", None), "bias": ("bias", None)},
}


def _lookup(tree: dict, name: str):
  node = tree
  for part in name.split("."):
    node = node[int(part) if part.isdigit() else part]
  return node


def torch_model(cfg: rm.RecsysConfig, params: Any) -> nn.Module:
  """The PyTorch twin of ``cfg``'s model with the values of the JAX ``params``.

  Args:
    cfg: the model's sizes.
    params: the JAX parameters (``nnx.State`` from ``nnx.split``, as
      :func:`recsys_models.build` gives them).

  Returns:
    ``Ranking`` module: ``model(batch) -> (T,)`` task losses (float32).

  Raises:
    ValueError: if a JAX parameter has no PyTorch counterpart or shapes differ.
  """
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  net = _CLASSES[cfg.model](cfg)
  used = set()
  with torch.no_grad():
    for name, module in net.named_modules():
      rule = _COPY.get(type(module))
      if rule is None:
        continue
      node = _lookup(pure, name)
      for attr, (key, fn) in rule.items():
        value = np.asarray(node[key], np.float32)
        value = fn(value) if fn is not None else value
        target = getattr(module, attr)
        if tuple(target.shape) != value.shape:
          raise ValueError(f"{name}.{attr}: shape {tuple(target.shape)} vs JAX {value.shape}")
        target.copy_(torch.from_numpy(np.array(value)))
        used.add(f"{name}.{key}")
  jax_names = {
    ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(pure)
  }
  if jax_names != used:
    raise ValueError(f"JAX parameters without a PyTorch twin: {sorted(jax_names - used)}")
  return Ranking(net, cfg)


def twin(model: Ranking) -> Ranking:
  """A second module tree holding the very same ``nn.Parameter`` objects as
  ``model`` (no copy): for torchjd's ``autogram.Engine``, whose hooks stay on
  the modules it is given, next to an unhooked ``model`` that trains the same
  parameters."""
  with torch.device("meta"):
    other = Ranking(_CLASSES[model.cfg.model](model.cfg), model.cfg)
  for (name, a), (name_b, b) in zip(model.named_modules(), other.named_modules()):
    assert name == name_b, (name, name_b)
    for pname, param in a.named_parameters(recurse=False):
      setattr(b, pname, param)
  return other


def to_torch(batch: dict) -> dict:
  """A batch of JAX arrays as PyTorch tensors (ids int64, features float32)."""
  out = {}
  for key, value in batch.items():
    arr = np.asarray(value)
    out[key] = torch.from_numpy(
      arr.astype(np.int64) if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.float32)
    )
  return out


def max_loss_difference(cfg: rm.RecsysConfig, *, batch_size: int = 64, seed: int = 0) -> float:
  """Largest absolute difference of the task losses of the JAX model and its
  PyTorch twin on one batch (float32 both; expect ~1e-6)."""
  loss_fn, params, batch_fn = rm.build(cfg, seed)
  batch = batch_fn(jax.random.PRNGKey(seed), batch_size)
  ours = np.asarray(jax.jit(loss_fn)(params, batch))
  with torch.no_grad():
    theirs = torch_model(cfg, params)(to_torch(batch)).numpy()
  return float(np.max(np.abs(ours - theirs)))
