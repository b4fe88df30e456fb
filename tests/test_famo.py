"""FAMO (Liu et al., NeurIPS 2023) against torchjd's FAMO scalarizer (weights
= gradient of its scalarized loss, logits learnt by its internal Adam), in
both modes: the paper's exact rule (``losses_after_step=``) and the default
one-step-lag rule (the next update's losses as the "after" losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import flat10, rand_grads, stacked10

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def run(tx, flats, losses, afters=None):
  """float64 jitted updates; ``afters[k]`` goes with update ``k`` (or none)."""
  with jax.enable_x64(True):
    state = tx.init({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
    outs, logits = [], []
    for k, (f, l) in enumerate(zip(flats, losses)):
      kw = {"task_losses": jnp.asarray(l)}
      if afters is not None and afters[k] is not None:
        kw["losses_after_step"] = jnp.asarray(afters[k])
      u, state = jax.jit(tx.update)(stacked10(f), state, **kw)
      outs.append(flat10(u))
      logits.append(np.asarray(state.logits))
  return outs, logits


def torch_famo(t, lr, wd, losses, after_of):
  """torchjd FAMO: weights of each step (autograd of the scalarized loss
  with respect to the losses) and the logits after each ``update``."""
  import torch
  from torchjd.scalarization import FAMO

  famo = FAMO(t, lr=lr, weight_decay=wd).double()
  ws, logits = [], []
  for k, l in enumerate(losses):
    values = torch.tensor(l, requires_grad=True)
    (w,) = torch.autograd.grad(famo(values), values)
    ws.append(w.numpy())
    after = after_of(k)
    if after is not None:
      famo.update(torch.tensor(after))
    logits.append(famo._w.detach().numpy().copy())
  return ws, logits


@pytest.mark.torchjd
def test_famo_exact_rule_matches_torchjd():
  pytest.importorskip("torchjd")
  rng = np.random.default_rng(0)
  t, lr, wd, n = 3, 0.05, 1e-3, 6
  flats = [rand_grads(rng, t) for _ in range(n)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(n)]
  afters = [l * rng.uniform(0.6, 1.0, t) for l in losses]  # same batch, after the step
  ws, t_logits = torch_famo(t, lr, wd, losses, lambda k: afters[k])
  # ours: the after-losses of step k arrive with update k + 1
  outs, logits = run(m.famo(lr, wd, num_tasks=t), flats, losses, [None] + afters[:-1])
  for k in range(n):
    np.testing.assert_allclose(outs[k], ws[k] @ flats[k], rtol=1e-9)
  for k in range(n - 1):  # our logits after update k+1 = theirs after update(k)
    np.testing.assert_allclose(logits[k + 1], t_logits[k], rtol=1e-9, atol=1e-12)


@pytest.mark.torchjd
def test_famo_lag_rule_matches_torchjd_fed_the_next_losses():
  pytest.importorskip("torchjd")
  rng = np.random.default_rng(1)
  t, lr, wd, n = 4, 0.025, 1e-3, 6
  flats = [rand_grads(rng, t) for _ in range(n)]
  losses = [rng.uniform(0.5, 2.0, t) for _ in range(n)]
  ws, _ = torch_famo(t, lr, wd, losses, lambda k: losses[k + 1] if k + 1 < n else None)
  outs, _ = run(m.famo(lr, wd, num_tasks=t), flats, losses)
  for k in range(n):
    np.testing.assert_allclose(outs[k], ws[k] @ flats[k], rtol=1e-9)


def test_famo_weights_formula_and_logit_gradient():
  """Paper's formulas, by hand: w_i = c z_i / l_i (sum 1), and the logit
  gradient is the softmax Jacobian transposed times the log-loss decrease."""
  l = np.array([0.5, 1.0, 4.0])
  xi = np.array([0.2, -0.1, 0.3])
  z = np.exp(xi) / np.exp(xi).sum()
  w = z / (l + 1e-8)
  np.testing.assert_allclose(
    m.famo_weights(jnp.asarray(l), jnp.asarray(xi)), w / w.sum(), rtol=1e-6
  )
  after = l * np.array([0.9, 0.5, 1.0])
  delta = np.log(l + 1e-8) - np.log(after + 1e-8)
  jac = np.diag(z) - np.outer(z, z)
  np.testing.assert_allclose(
    m.famo_logit_gradient(jnp.asarray(xi), jnp.asarray(l), jnp.asarray(after)),
    jac.T @ delta,
    rtol=1e-5,
    atol=1e-7,
  )


def test_famo_injectable_first_step_and_bad_after_losses():
  tx = gj.inject_hyperparams(m.famo)(lr=0.1, weight_decay=0.0, num_tasks=2)
  state = tx.init({"w": jnp.zeros(2)})
  g = {"w": jnp.eye(2)}
  upd, state = jax.jit(tx.update)(g, state, task_losses=jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(upd["w"], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(state.inner_state.logits, 0.0)  # nothing learnt yet
  upd, state2 = jax.jit(tx.update)(
    g, state, task_losses=jnp.array([1.0, 3.0]), losses_after_step=jnp.array([jnp.nan, 1.0])
  )
  np.testing.assert_allclose(state2.inner_state.logits, 0.0)  # non-finite: step skipped
  w, _ = gj.task_weights(tx, None, state, task_losses=jnp.array([1.0, 3.0]))
  assert w.shape == (2,)
  with pytest.raises(ValueError, match="min_losses"):
    m.famo(num_tasks=2, min_losses=jnp.zeros(3))
