"""Quickstart: one multi-task training loop with GradCraft in front of Adam.

Two regression heads share a hidden layer. Each step computes the per-task
losses and the *stacked* per-task gradients (every leaf gets a leading task
axis ``T``) in one forward pass, lets GradCraft combine the ``T`` gradients
into one update (Gram matrix -> task weights -> weighted sum), and hands it
to Adam. The weights GradCraft used are printed with ``task_weights``.

Run: ``python examples/quickstart.py`` (a few seconds on a CPU).
"""

import jax
import jax.numpy as jnp
import optax

import gradcraft_jax as gj


def loss_fn(params, batch):
  """(T,) task losses: the mean squared error of each head."""
  h = jnp.tanh(batch["x"] @ params["shared"])
  return jnp.mean((h @ params["heads"] - batch["y"]) ** 2, axis=0)


def make_data(key, n=256):
  """Two related targets of the same 3 inputs: their gradients on the shared
  layer partly conflict."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, 3))
  w = jax.random.normal(kw, (3,))
  y = jnp.stack([jnp.sin(x @ w), -jnp.cos(x @ w) + 0.5 * x[:, 0]], axis=1)
  return {"x": x, "y": y}


def main(steps=300):
  kd, kp = jax.random.split(jax.random.PRNGKey(0))
  batch = make_data(kd)
  params = {"shared": 0.5 * jax.random.normal(kp, (3, 16)), "heads": jnp.zeros((16, 2))}

  method = gj.gradcraft(tau=0.5, eps=0.1)  # the multi-task step: stacked -> one update
  tx = optax.chain(method, optax.adam(1e-2))  # then any optax optimizer
  opt_state = tx.init(params)
  grad_fn = gj.per_task_value_and_grad(loss_fn)  # (T,) losses and stacked gradients

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  first = None
  for i in range(steps):
    params, opt_state, losses = step(params, opt_state, batch)
    first = losses if first is None else first
    if i % 100 == 0:
      print(f"step {i:3d}  task losses {losses}")

  # The weights behind the last update: update = sum_i w_i g_i.
  _, grads = grad_fn(params, batch)
  w, _ = gj.task_weights(method, grads, opt_state[0])
  print(f"final task losses {losses} (start {first}); GradCraft weights {w}")
  return first, losses


if __name__ == "__main__":
  main()
