"""IMTL-L (Liu et al., ICLR 2021) on its own: a NumPy loop of the paper's
loss and torchjd's IMTLL scalarizer trained with SGD on its scales."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax.methods as m


def test_imtl_l_matches_loop():
  rng = np.random.default_rng(3)
  t, lr = 3, 0.2
  flats = [rand_grads(rng, t) for _ in range(4)]
  losses = [rng.uniform(0.2, 2.0, t) for _ in range(4)]
  outs, state = update_of(m.imtl_l(lr, num_tasks=t), flats, losses)
  s = np.zeros(t)
  for f, l, u in zip(flats, losses, outs):
    np.testing.assert_allclose(u, np.exp(s) @ f, rtol=1e-10)
    s = s - lr * (np.exp(s) * l - 1.0)  # d/ds (e^s l - s)
  np.testing.assert_allclose(state.log_scales, s, rtol=1e-10)


@pytest.mark.torchjd
def test_imtl_l_matches_torchjd_imtll_with_sgd():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import IMTLL

  rng = np.random.default_rng(4)
  t, lr = 3, 0.1
  scal = IMTLL(t).double()
  opt = torch.optim.SGD(scal.parameters(), lr=lr)
  flats = [rand_grads(rng, t) for _ in range(4)]
  losses = [rng.uniform(0.2, 2.0, t) for _ in range(4)]
  outs, state = update_of(m.imtl_l(lr, num_tasks=t), flats, losses)
  for f, l, u in zip(flats, losses, outs):
    values = torch.tensor(l, requires_grad=True)
    opt.zero_grad()
    loss = scal(values)
    (w,) = torch.autograd.grad(loss, values, retain_graph=True)
    loss.backward()
    opt.step()
    np.testing.assert_allclose(u, w.numpy() @ f, rtol=1e-10)
  np.testing.assert_allclose(state.log_scales, scal.log_scale.detach().numpy(), rtol=1e-10)


def test_imtl_l_reads_no_gram_and_injects_lr():
  tx = optax.inject_hyperparams(m.imtl_l)(lr=0.5, num_tasks=2)
  state = tx.init({"w": jnp.zeros(3)})
  g = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, jnp.nan]])}  # NaN only in a gradient
  upd, state = jax.jit(tx.update)(g, state, task_losses=jnp.array([2.0, 1.0]))
  assert not bool(jnp.all(jnp.isfinite(upd["w"])))  # visible in the sum
  # the combined update is non-finite, so the core keeps the state
  np.testing.assert_allclose(state.inner_state.log_scales, [0.0, 0.0])
  with pytest.raises(ValueError, match="lr"):
    m.imtl_l(-1.0, num_tasks=2)
