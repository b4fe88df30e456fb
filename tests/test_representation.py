"""Representation-level task weights (gradcraft_jax.representation)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradcraft_jax import gradcraft, mgda, upgrad
from gradcraft_jax.per_task import per_task_value_and_grad
from gradcraft_jax.representation import representation_value_and_grad
from gradcraft_jax.weighting import task_weights

T, B, D, H = 3, 4, 6, 5


def _model(seed=0, scale=1.7):
  """z = x @ W with x x^T = scale^2 I, so the Gram of the W-gradients is
  scale^2 times the Gram of the z-gradients."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(D, B)))  # orthonormal columns
  x = jnp.asarray(scale * q.T, jnp.float32)  # (B, D), x x^T = s^2 I
  params = {
    "w": jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
    "heads": jnp.asarray(rng.normal(size=(T, H)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(T, B)), jnp.float32),
  }
  return params, x


def encoder(p, x):
  return x @ p["w"]


def heads(p, z, x):
  del x
  preds = jnp.tanh(z) @ p["heads"].T  # (B, T)
  return jnp.mean((preds.T - jax.lax.stop_gradient(p["y"])) ** 2, axis=1)


def full_loss(p, x):
  return heads(p, encoder(p, x), x)


@pytest.mark.parametrize("factory", [mgda, gradcraft, upgrad])
def test_weights_equal_shared_parameter_weights_when_jacobian_is_isometric(factory):
  params, x = _model()
  tx = factory()
  state = tx.init(params)
  _, _, w, _ = jax.jit(representation_value_and_grad(encoder, heads, tx))(params, state, x)
  # Reference: the same weighting on the per-task gradients w.r.t. the shared
  # parameters W (jacrev, independent of the code under test).
  jac_w = jax.jacrev(full_loss)(params, x)["w"]  # (T, D, H)
  w_ref, _ = task_weights(tx, {"w": jac_w}, state, task_losses=full_loss(params, x))
  np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=2e-4, atol=1e-5)


def test_weighted_backward_equals_weighted_jacobian_rows():
  params, x = _model(seed=3)
  tx = gradcraft()
  fn = representation_value_and_grad(encoder, heads, tx)
  losses, grads, w, _ = fn(params, tx.init(params), x)
  np.testing.assert_allclose(np.asarray(losses), np.asarray(full_loss(params, x)), rtol=1e-6)
  jac = jax.jacrev(full_loss)(params, x)
  for k in params:
    expected = np.tensordot(np.asarray(w), np.asarray(jac[k]), axes=1)
    np.testing.assert_allclose(np.asarray(grads[k]), expected, rtol=1e-4, atol=1e-6)


def test_representation_gradients_match_per_task_value_and_grad():
  params, x = _model(seed=5)
  z = encoder(params, x)
  _, gz = per_task_value_and_grad(lambda zz: heads(params, zz, x))(z)
  # weights from task_weights on gz are those the function uses
  tx = mgda()
  w_ref, _ = task_weights(tx, gz, tx.init(None))
  _, _, w, _ = representation_value_and_grad(encoder, heads, tx)(params, tx.init(None), x)
  np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=1e-5)


def test_jitted_training_step_with_adam_decreases_losses():
  params, x = _model(seed=1)
  tx = gradcraft()
  fn = representation_value_and_grad(encoder, heads, tx)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s, o):
    losses, g, _, s = fn(p, s, x)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), s, o, losses

  p, s, o = params, tx.init(params), opt.init(params)
  first = None
  for _ in range(50):
    p, s, o, losses = step(p, s, o)
    first = losses if first is None else first
  assert float(jnp.sum(losses)) < float(jnp.sum(first))


def test_errors():
  with pytest.raises(TypeError, match="from_weighting"):
    representation_value_and_grad(encoder, heads, optax.chain(mgda(), optax.adam(1e-3)))
  with pytest.raises(TypeError, match="from_weighting"):
    task_weights(optax.adam(1e-3), {"a": jnp.ones((2, 3))}, None)
  params, x = _model()
  fn = representation_value_and_grad(encoder, lambda p, z, x: jnp.sum(z), mgda())
  with pytest.raises(ValueError, match="1-D"):
    fn(params, optax.EmptyState(), x)
