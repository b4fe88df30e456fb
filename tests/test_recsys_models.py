"""Tests of benchmarks/recsys_models.py (ranking models with embedding tables),
its PyTorch mirror, and the lean step on them against ``jax.jacrev``."""

import functools
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradcraft_jax as gj

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import recsys_models as rm  # noqa: E402

T = 3
B = 32
VOCAB = 50
SMALL = dict(
  num_tasks=T,
  vocab=VOCAB,
  embed_dim=4,
  side_vocab=(5, 3),
  side_dim=2,
  history_len=4,
  num_dense=3,
  bottom=(16, 8),
  expert=(8, 4),
  tower=(4,),
  n_experts=2,
)
# Each model once with stacked towers and once with separate ones (experts the
# other way round), the history feature on the item table or its own.
CASES = [
  ("shared_bottom", True, True),
  ("shared_bottom", False, False),
  ("mmoe", True, False),
  ("mmoe", False, True),
  ("ple", True, True),
  ("ple", False, False),
]


def config(model, stacked_towers, shared_history):
  return rm.RecsysConfig(
    model=model,
    stacked_towers=stacked_towers,
    stacked_experts=not stacked_towers,
    shared_history=shared_history,
    **SMALL,
  )


@functools.lru_cache(maxsize=None)
def problem(case):
  """(cfg, loss_fn, params, batch, losses) of a case, built and evaluated once."""
  cfg = config(*case)
  loss_fn, params, batch_fn = rm.build(cfg, seed=1)
  batch = batch_fn(jax.random.PRNGKey(7), B)
  return cfg, loss_fn, params, batch, jax.jit(loss_fn)(params, batch)


def test_batch_is_valid_and_has_duplicates():
  cfg = config("mmoe", True, True)
  batch_fn = rm.make_batch_fn(cfg)
  b = batch_fn(jax.random.PRNGKey(0), 256)
  assert b["user"].shape == (256,) and b["history"].shape == (256, cfg.history_len)
  assert b["side"].shape == (256, 2) and b["dense"].shape == (256, cfg.num_dense)
  assert b["labels"].shape == (256, T)
  assert int(b["user"].min()) >= 0 and int(b["user"].max()) < VOCAB
  assert int(b["item"].min()) >= 1 and int(b["item"].max()) < VOCAB  # 0 is the padding row
  hist = np.asarray(b["history"])
  assert hist.min() >= 0 and hist.max() < VOCAB
  # padding only after the valid ids of a row; some rows all padding, some full
  valid = hist != rm.PAD
  assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
  assert (~valid).all(axis=1).any() and valid.all(axis=1).any()
  for j, v in enumerate(cfg.side_vocab):
    assert 0 <= int(b["side"][:, j].min()) and int(b["side"][:, j].max()) < v
  assert set(np.unique(np.asarray(b["labels"]))) <= {0.0, 1.0}
  # Zipf-like: many duplicate ids in one batch
  assert len(np.unique(np.asarray(b["item"]))) < 0.5 * 256
  # same key, same batch; another key, another batch
  again = batch_fn(jax.random.PRNGKey(0), 256)
  chex.assert_trees_all_equal(b, again)
  assert not np.array_equal(np.asarray(batch_fn(jax.random.PRNGKey(1), 256)["user"]), b["user"])


def test_teacher_labels_are_learnable():
  """The labels depend on the features: a task's positive rate differs between
  the halves of a dense feature's weight direction (not coin flips)."""
  cfg = config("shared_bottom", True, True)
  b = rm.make_batch_fn(cfg)(jax.random.PRNGKey(3), 4096)
  labels = np.asarray(b["labels"])
  assert 0.05 < labels.mean() < 0.95
  # a logistic fit on the dense features alone beats the base rate for every task
  x = np.concatenate([np.asarray(b["dense"]), np.ones((4096, 1))], axis=1)
  aucs = []
  for t in range(T):
    w = np.zeros(x.shape[1])
    for _ in range(200):
      p = 1 / (1 + np.exp(-x @ w))
      w -= 0.5 * x.T @ (p - labels[:, t]) / len(x)
    aucs.append(rm.auc(labels[:, t : t + 1], (x @ w)[:, None])[0])
  assert min(aucs) > 0.55, aucs


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stacked{c[1]}-shared{c[2]}")
def test_shapes_and_parameter_layout(case):
  cfg, _, params, batch, losses = problem(case)
  assert losses.shape == (T,) and bool(jnp.all(jnp.isfinite(losses)))
  pure = jax.tree_util.tree_map(jnp.shape, params.to_pure_dict())
  feats = pure["features"]
  assert feats["user"]["embedding"] == (VOCAB, cfg.embed_dim)
  assert feats["item"]["embedding"] == (VOCAB, cfg.embed_dim)
  assert ("history" in feats) == (not cfg.shared_history)
  assert [feats["side"][j]["embedding"] for j in range(2)] == [(5, 2), (3, 2)]
  towers = pure["towers"]
  if cfg.stacked_towers:  # one module, (T, H, K) kernels
    assert towers["mlp"]["layers"][0]["kernel"][0] == T
    assert towers["mlp"]["layers"][1]["kernel"] == (T, cfg.tower[-1], 1)
  else:
    assert len(towers["mlps"]) == T
  if cfg.model == "mmoe":
    experts = pure["experts"]
    if cfg.stacked_experts:
      assert experts["mlp"]["layers"][1]["kernel"] == (cfg.n_experts, *cfg.expert)
    else:
      assert len(experts["mlps"]) == cfg.n_experts
  # the module of make_model holds the same values; a different seed differs
  chex.assert_trees_all_equal(nnx.split(rm.make_model(cfg, seed=1))[1], params)
  other = rm.init(cfg, seed=2)[1]
  assert not np.array_equal(
    other["features"]["user"]["embedding"][...], params["features"]["user"]["embedding"][...]
  )


@pytest.mark.extras
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stacked{c[1]}-shared{c[2]}")
def test_pytorch_mirror_gives_the_same_losses(case):
  pytest.importorskip("torch")
  import recsys_models_torch as rt  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  cfg, loss_fn, params, batch, losses = problem(case)
  model = rt.torch_model(cfg, params)
  ours = np.asarray(losses)
  theirs = model(rt.to_torch(batch))
  np.testing.assert_allclose(theirs.detach().numpy(), ours, rtol=1e-5, atol=1e-6)
  # and the same gradients of the summed losses (embedding tables included)
  theirs.sum().backward()
  ref = rt.torch_model(cfg, jax.grad(lambda p: jnp.sum(loss_fn(p, batch)))(params))
  for (name, p), (_, g) in zip(model.named_parameters(), ref.named_parameters()):
    np.testing.assert_allclose(
      p.grad.numpy(), g.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name
    )
  del torch


@pytest.mark.parametrize(
  "case",
  [CASES[0], CASES[2], pytest.param(CASES[4], marks=pytest.mark.slow)],  # PLE: ~10 s of jit
  ids=lambda c: c[0],
)
def test_lean_step_equals_stacked_update_from_jacrev(case):
  """``combined_value_and_grad`` with GradCraft gives the update GradCraft
  makes from the stacked gradients of ``jax.jacrev`` (independent of the
  library's per-task pullback), embedding tables with duplicate ids included."""
  _, loss_fn, params, batch, _ = problem(case)
  assert len(np.unique(np.asarray(batch["item"]))) < B  # duplicate ids
  method = gj.gradcraft(0.5, 0.1)
  state = method.init(params)
  losses, grads, _ = jax.jit(gj.combined_value_and_grad(loss_fn, method))(params, state, batch)

  @jax.jit
  def reference(params, batch):
    stacked = jax.jacrev(loss_fn)(params, batch)
    ref_losses = loss_fn(params, batch)
    update, _ = method.update(stacked, state, params, task_losses=ref_losses)
    return ref_losses, update

  ref_losses, ref = reference(params, batch)
  chex.assert_trees_all_close(losses, ref_losses, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref, rtol=2e-4, atol=2e-6)
  # the tables get a non-zero update only on the rows the batch reads
  table = np.asarray(grads["features"]["user"]["embedding"][...])
  read = np.zeros(VOCAB, bool)
  read[np.asarray(batch["user"])] = True
  assert np.all(table[~read] == 0) and np.any(table[read] != 0)
