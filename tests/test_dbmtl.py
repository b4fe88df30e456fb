"""DB-MTL (Lin et al., 2023) against a loop over steps and tasks, the paper's
EMA of full gradients, and the balance of log-gradient norms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import (
  apply,
  cos,
  flat,
  random_jacobian,
  stacked,
)

from gradcraft_jax.methods import (
  dbmtl,
)


def dbmtl_reference(js, losses, beta, beta_sigma, eps=1e-8):
  """Loop over steps and tasks; EMA of log-gradient norms (the O(T) variant
  documented in dbmtl), factors applied to the current log-gradients."""
  t = js[0].shape[0]
  ema = np.zeros(t)
  outs = []
  for step, (j, l) in enumerate(zip(js, losses), start=1):
    b = beta / step**beta_sigma
    logg = [j[i] / (l[i] + eps) for i in range(t)]
    for i in range(t):
      ema[i] = b * ema[i] + (1 - b) * np.linalg.norm(logg[i])
    outs.append(sum(ema.max() / ema[i] * logg[i] for i in range(t)))
  return outs


def test_dbmtl_matches_reference():
  rng = np.random.default_rng(0)
  t = 4
  js = [random_jacobian(rng, t, 12) for _ in range(5)]
  ls = [rng.uniform(0.1, 3.0, t) for _ in range(5)]
  ref = dbmtl_reference(js, ls, 0.9, 0.5)
  tx = dbmtl(0.9, 0.5, num_tasks=t)
  g0 = stacked(js[0])
  state = tx.init(jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), g0))
  upd_fn = jax.jit(tx.update)
  for j, l, r in zip(js, ls, ref):
    upd, state = upd_fn(stacked(j), state, task_losses=jnp.asarray(l))
    np.testing.assert_allclose(flat(upd), r, rtol=2e-5, atol=1e-5 * np.abs(r).max())
  assert int(state.count) == 5


def test_dbmtl_equals_full_gradient_ema_for_constant_gradients():
  """With constant gradients and losses the paper's EMA of full gradients
  and this EMA of norms give the same update at every step."""
  rng = np.random.default_rng(1)
  t = 3
  j = random_jacobian(rng, t, 10)
  l = rng.uniform(0.5, 2.0, t)
  tx = dbmtl(0.9, 0.5, num_tasks=t)
  state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(7)})
  buf = np.zeros_like(j)
  for step in range(1, 4):
    b = 0.9 / step**0.5
    buf = b * buf + (1 - b) * j / (l[:, None] + 1e-8)
    n = np.linalg.norm(buf, axis=1)
    paper = ((n.max() / n)[:, None] * buf).sum(0)
    upd, state = tx.update(stacked(j), state, task_losses=jnp.asarray(l))
    # The paper's update is built from the (shrunk) averaged gradients;
    # the directions agree exactly.
    assert cos(flat(upd), paper) > 1 - 1e-6


def test_dbmtl_balances_log_gradient_norms():
  rng = np.random.default_rng(2)
  j = random_jacobian(rng, 3, 8)
  l = np.array([0.1, 1.0, 10.0])
  tx = dbmtl(0.0, 0.0, num_tasks=3)  # no averaging: alpha from this step
  out = apply(tx, j, task_losses=jnp.asarray(l))
  logg = j / l[:, None]
  n = np.linalg.norm(logg, axis=1)
  np.testing.assert_allclose(out, (n.max() * logg / n[:, None]).sum(0), rtol=1e-5)


def test_dbmtl_bad_hyperparameters():
  with pytest.raises(ValueError):
    dbmtl(1.0, num_tasks=2)
  with pytest.raises(ValueError):
    dbmtl(0.9, -1.0, num_tasks=2)
  with pytest.raises(ValueError):
    dbmtl(0.9, num_tasks=0)
