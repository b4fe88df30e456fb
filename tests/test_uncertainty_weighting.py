"""Uncertainty weighting (Kendall et al., CVPR 2018) against a NumPy loop
over steps (log-variance SGD written from the paper's loss)."""

import jax
import jax.numpy as jnp
import numpy as np
from method_helpers import (
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m
from gradcraft_jax.methods._uncertainty import uncertainty_log_var_step


def test_uncertainty_weighting_matches_loop():
  rng = np.random.default_rng(1)
  t, lr = 3, 0.3
  flats = [rand_grads(rng, t) for _ in range(4)]
  losses = [rng.uniform(0.1, 3.0, t) for _ in range(4)]
  outs, state = update_of(m.uncertainty_weighting(lr, num_tasks=t), flats, losses)
  s = np.zeros(t)
  for f, l, u in zip(flats, losses, outs):
    np.testing.assert_allclose(u, np.exp(-s) @ f, rtol=1e-10)
    # d/ds_i of exp(-s_i) l_i + s_i
    s = s - lr * (-np.exp(-s) * l + 1.0)
  np.testing.assert_allclose(state.log_vars, s, rtol=1e-10)


def test_uncertainty_log_var_step_is_the_loss_gradient():
  s = jnp.array([0.3, -1.0], jnp.float32)
  l = jnp.array([2.0, 0.5], jnp.float32)
  grad = jax.grad(lambda s: jnp.sum(jnp.exp(-s) * l + s))(s)
  np.testing.assert_allclose(
    uncertainty_log_var_step(s, l, 0.1),
    s - 0.1 * grad,
    rtol=1e-6,
  )
