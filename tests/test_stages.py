"""Tests of the stage-wise NMT driver (gradcraft_jax.stages)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradcraft_jax.stages import PrioritizedResult, train_prioritized


def _lexicographic_losses(x, batch=None):
  """Three tasks whose lexicographic optimum is x = (1, 2, 5):
  task 0 fixes x0 = 1, task 1 then fixes x1 = 3 - x0 = 2 and task 2 (which
  would like x1 = 0) can only set x2 = 5, reaching l2 = 4."""
  del batch
  return jnp.stack([(x[0] - 1.0) ** 2, (x[0] + x[1] - 3.0) ** 2, (x[2] - 5.0) ** 2 + x[1] ** 2])


@pytest.mark.parametrize("use_nmt_loss", [False, True])
def test_three_stages_reach_lexicographic_optimum(use_nmt_loss):
  res = train_prioritized(
    _lexicographic_losses,
    jnp.zeros(3),
    None,
    optimizer=optax.sgd(0.05),
    steps_per_stage=400,
    lagrange_lr=0.5,
    lagrange_clip=100.0,
    use_nmt_loss=use_nmt_loss,
  )
  assert isinstance(res, PrioritizedResult)
  assert res.targets.shape == (3,) and len(res.history) == 3
  # Stage 0 solves task 0 exactly; stage 1 solves task 1 within task 0's
  # constraint; the targets are the last-tenth means of the training losses.
  assert res.targets[0] < 1e-6 and res.targets[1] < 1e-3
  for k, h in enumerate(res.history):
    assert h.task == k
    assert h.losses.shape == (400, 3)
    assert h.multipliers.shape == (400, k)
    np.testing.assert_allclose(h.target, h.losses[-40:, k].mean())
  final = np.asarray(_lexicographic_losses(res.params))
  np.testing.assert_allclose(np.asarray(res.params), [1.0, 2.0, 5.0], atol=0.3)
  assert final[0] < 0.05 and final[1] < 0.05  # constraints (nearly) hold
  assert final[2] < res.history[1].losses[-1, 2]  # task 2 improved
  # Equal weighting of the three tasks goes to x = (5/3, 2/3, 5) instead,
  # with l0 = l1 = 4/9: both higher-priority targets broken.
  assert final[0] < 0.1 * 4 / 9 and final[1] < 0.1 * 4 / 9
  # Each stage starts from the previous one's parameters.
  np.testing.assert_allclose(np.asarray(res.history[2].params), np.asarray(res.params))


def test_both_gradient_paths_agree_with_minibatches():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(8, 16, 4)).astype(np.float32)
  ys = rng.normal(size=(8, 16, 3)).astype(np.float32)

  def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2, axis=0)

  params = {
    "w1": jnp.asarray(rng.normal(size=(4, 8)) * 0.5, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(8, 3)) * 0.5, jnp.float32),
  }
  data = lambda stage, step: (xs[step % 8], ys[step % 8])
  kw = dict(
    optimizer=optax.adam(1e-2),
    steps_per_stage=[30, 20, 20],
    lagrange_lr=0.3,
    lagrange_clip=5.0,
    target_window=8,
  )
  a = train_prioritized(loss_fn, params, data, **kw)
  b = train_prioritized(loss_fn, params, data, use_nmt_loss=True, **kw)
  np.testing.assert_allclose(a.targets, b.targets, rtol=1e-4)
  for h1, h2 in zip(a.history, b.history):
    np.testing.assert_allclose(h1.multipliers, h2.multipliers, rtol=1e-4, atol=1e-5)
  for k in params:
    np.testing.assert_allclose(
      np.asarray(a.params[k]), np.asarray(b.params[k]), rtol=1e-3, atol=1e-4
    )
  np.testing.assert_allclose(a.targets[0], a.history[0].losses[-8:, 0].mean())


def test_each_stage_traced_once_and_eval_targets():
  traces = []

  def loss_fn(x, batch):
    traces.append(1)
    return _lexicographic_losses(x) + batch

  rng = np.random.default_rng(1)
  noise = rng.uniform(0, 0.01, (3, 50, 3)).astype(np.float32)
  data = lambda stage, step: jnp.asarray(noise[stage, step])
  held_out = lambda x: _lexicographic_losses(x) + 0.5
  res = train_prioritized(
    loss_fn,
    jnp.zeros(3),
    data,
    num_stages=2,
    optimizer=optax.sgd(0.05),
    steps_per_stage=50,
    lagrange_lr=0.5,
    lagrange_clip=10.0,
    eval_fn=held_out,
  )
  assert len(traces) == 2  # one trace per stage, none per step
  assert res.targets.shape == (2,)
  np.testing.assert_allclose(res.targets[0], float(held_out(res.history[0].params)[0]), rtol=1e-6)
  np.testing.assert_allclose(res.targets[1], float(held_out(res.params)[1]), rtol=1e-6)


def test_bad_arguments():
  kw = dict(optimizer=optax.sgd(0.1), lagrange_lr=0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="steps_per_stage"):
    train_prioritized(_lexicographic_losses, jnp.zeros(3), None, steps_per_stage=[5, 5], **kw)
  with pytest.raises(ValueError, match="lagrange_lr"):
    train_prioritized(
      _lexicographic_losses,
      jnp.zeros(3),
      None,
      steps_per_stage=5,
      optimizer=optax.sgd(0.1),
      lagrange_lr=-1.0,
      lagrange_clip=1.0,
    )
  with pytest.raises(ValueError, match="num_stages"):
    train_prioritized(
      _lexicographic_losses, jnp.zeros(3), None, steps_per_stage=5, num_stages=0, **kw
    )
