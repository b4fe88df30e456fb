"""CR-MOGM (Zhou et al., NeurIPS 2022): an exponential moving average of any
method's weights. Checked against a NumPy EMA of the wrapped method's own
weights, torchjd's CRMOGMWeighting around UPGrad, and through the query
protocol (task_weights, inject_hyperparams, the lean step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import flat10, rand_grads, stacked10

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def PARAMS64():
  return {"a": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros(4, jnp.float64)}


def inner_weights(inner, flats, losses=None):
  """The wrapped method's weights at each update, running it alone."""
  with jax.enable_x64(True):
    state = inner.init(PARAMS64())
    out = []
    for k, f in enumerate(flats):
      kw = {} if losses is None else {"task_losses": jnp.asarray(losses[k])}
      w, state = gj.task_weights(inner, stacked10(f), state, **kw)
      out.append(np.asarray(w))
  return out


def run(tx, flats, losses=None):
  with jax.enable_x64(True):
    state = tx.init(PARAMS64())
    outs = []
    for k, f in enumerate(flats):
      kw = {} if losses is None else {"task_losses": jnp.asarray(losses[k])}
      u, state = jax.jit(tx.update)(stacked10(f), state, **kw)
      outs.append(flat10(u))
  return outs, state


@pytest.mark.parametrize(
  "make,needs_losses",
  [(lambda t: m.mgda(), False), (lambda t: m.dwa(2.0, num_tasks=t), True)],
  ids=["mgda", "dwa"],
)
def test_cr_mogm_is_ema_of_inner_weights(make, needs_losses):
  rng = np.random.default_rng(0)
  t, alpha, n = 3, 0.7, 5
  flats = [rand_grads(rng, t) for _ in range(n)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(n)] if needs_losses else None
  hats = inner_weights(make(t), flats, losses)
  outs, state = run(m.cr_mogm(make(t), alpha, num_tasks=t), flats, losses)
  lam = None
  for f, h, u in zip(flats, hats, outs):
    lam = h if lam is None else alpha * lam + (1 - alpha) * h
    np.testing.assert_allclose(u, lam @ f, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(state.weights, lam, rtol=1e-8)


@pytest.mark.torchjd
def test_cr_mogm_upgrad_matches_torchjd():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.aggregation import CRMOGMWeighting, GramianWeightedAggregator, UPGradWeighting

  rng = np.random.default_rng(1)
  t, alpha, n = 4, 0.8, 4
  flats = [rand_grads(rng, t) for _ in range(n)]
  agg = GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting(), alpha=alpha))
  # torchjd UPGrad regularises the Gramian with reg_eps=1e-4 (ours: 0 by default)
  outs, _ = run(m.cr_mogm(m.upgrad(reg_eps=1e-4), alpha, num_tasks=t), flats)
  for f, u in zip(flats, outs):
    ref = agg(torch.tensor(f)).numpy()
    np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-6 * np.abs(f).max())


def test_cr_mogm_initial_weights_alpha_bounds_and_non_methods():
  g = stacked10(np.eye(2, 10), jnp.float32)
  tx = m.cr_mogm(m.mean(), 0.5, num_tasks=2, initial_weights=jnp.array([1.0, 0.0]))
  w, _ = gj.task_weights(tx, g, tx.init(None))
  np.testing.assert_allclose(w, [0.75, 0.25])
  with pytest.raises(ValueError, match="alpha"):
    m.cr_mogm(m.mean(), 1.5, num_tasks=2)
  with pytest.raises(TypeError):
    m.cr_mogm(optax.sgd(0.1), 0.5, num_tasks=2)
  with pytest.raises(ValueError, match="initial_weights"):
    m.cr_mogm(m.mean(), 0.5, num_tasks=2, initial_weights=jnp.ones(3))


def test_cr_mogm_injectable_inside_and_out():
  inner = gj.inject_hyperparams(m.dwa)(temperature=2.0, num_tasks=2)
  tx = gj.inject_hyperparams(m.cr_mogm)(method=inner, alpha=0.5, num_tasks=2)
  state = tx.init({"w": jnp.zeros(3)})
  g = {"w": jnp.ones((2, 3))}
  for l in ([1.0, 1.0], [1.0, 2.0], [1.0, 2.0]):
    u, state = jax.jit(tx.update)(g, state, task_losses=jnp.asarray(l))
  w_dwa = 2 * jax.nn.softmax(jnp.array([1.0, 2.0]) / 2.0)
  np.testing.assert_allclose(state.inner_state.weights, 0.5 * 1.0 + 0.5 * w_dwa, rtol=1e-6)


def test_cr_mogm_nonfinite_inner_keeps_average():
  tx = m.cr_mogm(m.mgda(), 0.5, num_tasks=2)
  state = tx.init(None)
  g = stacked10(np.eye(2, 10), jnp.float32)
  _, state = tx.update(g, state)
  bad = stacked10(np.where(np.eye(2, 10) > 0, np.nan, 0.0), jnp.float32)
  u, state2 = tx.update(bad, state)
  assert not np.all(np.isfinite(flat10(u)))
  np.testing.assert_allclose(state2.weights, state.weights)


def test_cr_mogm_lean_step_equals_update():
  def fun(w, x):
    return jnp.stack([jnp.sum((x @ w - 1.0) ** 2), jnp.sum((x @ w + 0.5) ** 2), jnp.sum(w**2)])

  w, x = jnp.arange(3.0), jnp.eye(3) + 0.1
  method = m.cr_mogm(m.upgrad(), 0.5, num_tasks=3)
  step = jax.jit(gj.combined_value_and_grad(fun, method))
  losses, grads, _ = step(w, method.init(w), x)
  _, stacked = gj.per_task_value_and_grad(fun)(w, x)
  ref, _ = method.update(stacked, method.init(w), w, task_losses=losses)
  np.testing.assert_allclose(grads, ref, rtol=1e-4, atol=1e-5)
