"""Tests of benchmarks/mtl_models.py (NNX multi-task models, losses, AUC)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import mtl_models  # noqa: E402

CARDS = (5, 7, 3, 11)
N_NUM = 4
T = 3
SMALL = {
  "shared_bottom": dict(embed_dim=4, bottom_sizes=(32, 16), tower_sizes=(8,)),
  "mmoe": dict(embed_dim=4, n_experts=3, expert_sizes=(16, 8), tower_sizes=(8,)),
  "ple": dict(
    embed_dim=4, n_experts=2, n_task_experts=1, expert_sizes=(16, 8), n_levels=2, tower_sizes=(8,)
  ),
}


def _batch(n=64, seed=0):
  rng = np.random.default_rng(seed)
  cat = np.stack([rng.integers(0, c, n) for c in CARDS], axis=1).astype(np.int32)
  num = rng.normal(size=(n, N_NUM)).astype(np.float32)
  labels = (rng.random((n, T)) < 0.4).astype(np.float32)
  return {"cat": cat, "num": num, "labels": labels}


def _model(name, seed=0):
  return mtl_models.MODELS[name](CARDS, N_NUM, T, rngs=nnx.Rngs(seed), **SMALL[name])


def _jitted(model, method):
  """``method(model, *args)`` as a jitted pure function of the model's params (eager NNX is slow)."""
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda p, *args: method(nnx.merge(graphdef, p), *args))
  return lambda *args: fn(params, *args)


@pytest.mark.parametrize("name", sorted(mtl_models.MODELS))
def test_shapes_and_representation(name):
  model = _model(name)
  b = _batch(10)
  forward = _jitted(model, lambda m, c, n: (m(c, n), mtl_models.representation(m, c, n)))
  logits, z = forward(b["cat"], b["num"])
  assert logits.shape == (10, T)
  assert jnp.isfinite(logits).all()
  assert z.ndim == 2 and z.shape[0] == 10
  np.testing.assert_allclose(
    _jitted(model, lambda m, z: m.head(z))(z), logits, rtol=1e-5, atol=1e-6
  )
  # Default-sized model: output shape only (abstract evaluation).
  big = mtl_models.MODELS[name](CARDS, N_NUM, 2, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(big)
  out = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(b["cat"], b["num"]), params)
  assert out.shape == (10, 2)


def test_shared_bottom_representation_size():
  model = _model("shared_bottom")
  b = _batch(6)
  z = jax.eval_shape(lambda: mtl_models.representation(model, b["cat"], b["num"]))
  assert z.shape == (6, 16)


def test_init_same_eagerly_and_traced():
  eager = _model("ple", seed=3)
  traced = nnx.eval_shape(lambda: _model("ple", seed=3))
  assert jax.tree.map(lambda x: x.shape, nnx.state(eager)) == jax.tree.map(
    lambda x: x.shape, nnx.state(traced)
  )
  jitted = nnx.jit(lambda: _model("mmoe", seed=3))()
  for a, c in zip(
    jax.tree.leaves(nnx.state(jitted)), jax.tree.leaves(nnx.state(_model("mmoe", seed=3)))
  ):
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", sorted(mtl_models.MODELS))
def test_losses_finite(name):
  model = _model(name)
  b = _batch(32)
  losses, logits = _jitted(
    model, lambda m, b: (mtl_models.bce_task_losses(m, b), m(b["cat"], b["num"]))
  )(b)
  assert losses.shape == (T,) and jnp.isfinite(losses).all()
  # By hand: optax BCE, mean per task.
  manual = optax.sigmoid_binary_cross_entropy(logits, b["labels"]).mean(0)
  np.testing.assert_allclose(losses, manual, rtol=1e-6)


@pytest.mark.parametrize("name", ["shared_bottom", "ple"])
def test_per_task_jacobian(name):
  model = _model(name)
  b = _batch(32)
  graphdef, params = nnx.split(model)
  loss_fn = mtl_models.make_loss_fn(graphdef)
  jac, g1, again = jax.jit(
    lambda p: (jax.jacrev(loss_fn)(p, b), jax.grad(lambda q: loss_fn(q, b)[1])(p), loss_fn(p, b))
  )(params)
  assert again.shape == (T,) and jnp.isfinite(again).all()
  for g, p in zip(jax.tree.leaves(jac), jax.tree.leaves(params)):
    assert g.shape == (T,) + p.shape
  # Row t of the Jacobian is the gradient of loss t.
  for a, c in zip(jax.tree.leaves(jac), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a[1], c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(mtl_models.MODELS))
def test_adam_steps_lower_every_task_loss(name):
  graphdef, params = nnx.split(_model(name))
  loss_fn = mtl_models.make_loss_fn(graphdef)
  opt = optax.adam(1e-2)
  state = opt.init(params)
  b = _batch(128, seed=1)

  @jax.jit
  def step(params, state):
    losses, vjp = jax.vjp(lambda p: loss_fn(p, b), params)
    (grads,) = vjp(jnp.ones_like(losses))  # gradient of the sum of the task losses
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, losses

  params, state, before = step(params, state)
  for _ in range(15):
    params, state, after = step(params, state)
  assert jnp.all(after < before), (before, after)


def test_evaluate_auc_runs():
  model = _model("mmoe")
  b = _batch(50)
  out = mtl_models.evaluate_auc(model, b, batch_size=16)
  assert out.shape == (T,) and np.all((out >= 0) & (out <= 1))


def _auc_brute_force(labels, scores):
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 60))
  labels = rng.integers(0, 2, n)
  labels[0], labels[1] = 0, 1
  scores = rng.normal(size=n)
  if seed % 2:
    scores = np.round(scores, 1)  # many ties
  assert mtl_models.auc(labels, scores) == pytest.approx(
    _auc_brute_force(labels, scores), abs=1e-12
  )


def test_auc_edge_cases():
  assert mtl_models.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert mtl_models.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
  assert mtl_models.auc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5
  assert np.isnan(mtl_models.auc([1, 1, 1], [0.1, 0.2, 0.3]))
  two = mtl_models.auc(
    np.array([[0, 1], [1, 0], [1, 1]]), np.array([[0.0, 0.5], [1.0, 0.1], [2.0, 0.9]])
  )
  np.testing.assert_allclose(two, [1.0, 1.0])
