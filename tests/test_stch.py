"""STCH (Lin et al., ICML 2024): the gradient of torchjd's STCH scalarizer
(raw losses, and log-losses via autograd through the log), the warm-up
nadir estimate against a NumPy loop, and LibMTL's variant (T times ours)."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import rand_grads, update_of

import gradcraft_jax as gj
import gradcraft_jax.methods as m


def stch_np(f, lam, z, mu):
  """Gradient of mu log sum exp(lam (f - z) / mu) with respect to f."""
  y = lam * (f - z) / mu
  e = np.exp(y - y.max())
  return lam * e / e.sum()


@pytest.mark.torchjd
@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_stch_raw_matches_torchjd(mu):
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import STCH

  rng = np.random.default_rng(0)
  t = 3
  lam = rng.dirichlet(np.ones(t))
  ref = rng.uniform(0.0, 0.3, t)
  g = rand_grads(rng, t)
  l = rng.uniform(0.5, 2.0, t)
  values = torch.tensor(l, requires_grad=True)
  scal = STCH(mu, weights=torch.tensor(lam), reference=torch.tensor(ref))
  (w_torch,) = torch.autograd.grad(scal(values), values)
  tx = m.stch(mu, num_tasks=t, preference=lam, reference=ref)
  (u,), _ = update_of(tx, [g], [l])
  np.testing.assert_allclose(u, w_torch.numpy() @ g, rtol=1e-9)
  np.testing.assert_allclose(
    m.stch_weights(jnp.asarray(l), mu=mu, preference=jnp.asarray(lam), reference=jnp.asarray(ref)),
    w_torch.numpy(),
    rtol=1e-5,
  )


@pytest.mark.torchjd
def test_stch_log_losses_with_warmup_matches_loop_and_torchjd():
  pytest.importorskip("torchjd")
  import torch
  from torchjd.scalarization import STCH

  rng = np.random.default_rng(1)
  t, mu, warm, n = 3, 0.5, 2, 5
  flats = [rand_grads(rng, t) for _ in range(n)]
  losses = [rng.uniform(0.2, 3.0, t) for _ in range(n)]
  outs, state = update_of(
    m.stch(mu, num_tasks=t, warmup_steps=warm, log_losses=True), flats, losses
  )
  lam = np.full(t, 1 / t)
  nadir = np.mean(losses[:warm], axis=0)
  for k, (f, l, u) in enumerate(zip(flats, losses, outs)):
    if k < warm:  # gradient of sum_i lam_i log l_i
      w = lam / l
    else:
      w = stch_np(np.log(l), lam, np.log(nadir), mu) / l
      values = torch.tensor(l, requires_grad=True)
      scal = STCH(mu, weights=torch.tensor(lam), reference=torch.tensor(np.log(nadir)))
      (w_torch,) = torch.autograd.grad(scal(torch.log(values)), values)
      np.testing.assert_allclose(w, w_torch.numpy(), rtol=1e-10)
    np.testing.assert_allclose(u, w @ f, rtol=1e-9)
  np.testing.assert_allclose(state.reference, nadir, rtol=1e-12)


def test_stch_libmtl_variant_is_t_times_ours():
  """LibMTL: T mu logsumexp(log(l / nadir) / mu) (lambda = 1)."""
  rng = np.random.default_rng(2)
  t, mu = 4, 1.0
  l, nadir = rng.uniform(0.2, 2.0, t), rng.uniform(0.5, 1.5, t)
  y = np.log(l / nadir) / mu
  libmtl = t * np.exp(y - y.max()) / np.exp(y - y.max()).sum() / l
  ours = m.stch_weights(
    jnp.asarray(l), mu=mu, preference=jnp.ones(t), reference=jnp.asarray(nadir), log_losses=True
  )
  np.testing.assert_allclose(t * np.asarray(ours), libmtl, rtol=1e-5)


def test_stch_small_mu_approaches_worst_task_and_injectable():
  l = jnp.array([1.0, 2.0, 1.5])
  w = m.stch_weights(l, mu=1e-3, preference=jnp.ones(3))
  np.testing.assert_allclose(w, [0.0, 1.0, 0.0], atol=1e-6)
  tx = gj.inject_hyperparams(m.stch)(mu=1e-3, num_tasks=3, preference=jnp.ones(3))
  w2, _ = gj.task_weights(tx, None, tx.init(None), task_losses=l)
  np.testing.assert_allclose(w2, w, atol=1e-6)
  with pytest.raises(ValueError, match="mu"):
    m.stch(0.0, num_tasks=3)
  with pytest.raises(ValueError, match="preference"):
    m.stch(1.0, num_tasks=3, preference=jnp.ones(2))


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_stch_raw_extreme_losses_jitted(scale):
  """Raw losses of 1e12 with a small mu: the exponents are centred on the
  largest one (XLA:CPU once recomputed it with a different rounding: NaN)."""
  import jax

  l = jnp.array([0.76, 1.79, 1.31], jnp.float32) * scale
  w = jax.jit(lambda l: m.stch_weights(l, mu=0.1))(l)
  expected = [0.0, 1 / 3, 0.0] if scale > 1 else [1 / 9, 1 / 9, 1 / 9]
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
