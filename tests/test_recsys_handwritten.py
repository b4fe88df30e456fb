"""benchmarks/recsys_handwritten.py (the yardstick of the ranking-model
benchmark) against ``jax.jacrev`` of the model: losses, Gram matrix and the
combined gradient of the methods."""

import os
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import gradcraft_jax as gj

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import recsys_handwritten as hw  # noqa: E402
import recsys_models as rm  # noqa: E402
from test_recsys_models import SMALL  # noqa: E402

# Small tables (50 rows): a batch of 32 repeats many user, item and history ids.
CFG = rm.RecsysConfig(**SMALL)


@pytest.fixture(scope="module")
def model():
  graphdef, params = rm.init(CFG, seed=1)
  batch = rm.make_batch_fn(CFG)(0, 32)
  loss_fn = rm.make_loss_fn(graphdef)
  jac = jax.jacrev(loss_fn)(params, batch)  # the reference: (T, ...) per leaf
  return params, batch, loss_fn, nnx.to_pure_dict(jac)


def test_batch_has_duplicates_and_padding(model):
  _, batch, _, _ = model
  items = np.concatenate([np.ravel(batch["item"]), np.ravel(batch["history"])])
  assert len(np.unique(items)) < len(items) / 2
  assert np.any(np.asarray(batch["history"]) == rm.PAD)


def test_losses_equal_the_model(model):
  params, batch, loss_fn, _ = model
  p = nnx.to_pure_dict(params)
  dense = {"bottom": p["bottom"], "towers": p["towers"]}
  got = hw.head_losses(dense, hw.lookups(p, batch), batch)
  np.testing.assert_allclose(got, loss_fn(params, batch), rtol=1e-6)


@pytest.mark.parametrize("name", ["gradcraft", "upgrad"])
def test_gram_and_update_equal_jacrev(model, name):
  params, batch, _, jac = model
  method = {"gradcraft": lambda: gj.gradcraft(0.5, 0.1)}.get(name, getattr(gj, name, None))()
  p = nnx.to_pure_dict(params)
  losses, gram, grads, _ = jax.jit(lambda p, b, s: hw.gram_and_grad(p, b, method, s))(
    p, batch, method.init(p)
  )
  leaves = [np.asarray(x, np.float64).reshape(CFG.num_tasks, -1) for x in jax.tree.leaves(jac)]
  j = np.concatenate(leaves, axis=1)
  np.testing.assert_allclose(gram, j @ j.T, rtol=2e-5, atol=1e-7)
  w, _ = gj.task_weights(method, None, method.init(p), gram=j @ j.T, task_losses=losses)
  want = jax.tree.map(lambda g: np.tensordot(np.asarray(w, np.float64), g, 1), jac)
  got_leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  for a, b in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_trains_and_rejects_other_models():
  graphdef, params = rm.init(CFG, seed=2)
  loss_fn = rm.make_loss_fn(graphdef)
  batch = rm.make_batch_fn(CFG)(1, 64)
  adam = optax.adam(1e-2)
  method = gj.gradcraft()
  step = jax.jit(hw.make_step(CFG, method, adam))
  p = nnx.to_pure_dict(params)
  s, ms = adam.init(p), method.init(p)
  before = float(loss_fn(params, batch).sum())
  for _ in range(20):
    p, s, ms = step(p, s, ms, batch)
  nnx.replace_by_pure_dict(params, p)
  assert float(loss_fn(params, batch).sum()) < before
  with pytest.raises(ValueError, match="shared-bottom"):
    hw.make_step(rm.RecsysConfig(model="mmoe"), method, adam)


def test_benchmark_quick_run(tmp_path):
  import bench_recsys_handwritten as bench

  out = tmp_path / "hw.md"
  bench.main(["--quick", "--out", str(out)])
  text = out.read_text()
  assert "- command: python benchmarks/bench_recsys_handwritten.py --quick" in text
  assert "| 1,000 | 8 | gradcraft |" in text
