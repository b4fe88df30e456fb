"""GradNorm (Chen et al., ICML 2018) against a loop written from the paper's
Algorithm 1 (gradient of L_grad by torch autograd, the target held
constant), with the layer W a subset of the parameter leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import flat10, rand_grads, stacked10

import gradcraft_jax as gj
import gradcraft_jax.methods as m

# stacked10 puts columns 0..5 in leaf "a" and 6..9 in leaf "b"
LAYER = slice(0, 6)


def only_a(path):
  return path == "['a']"


def gradnorm_loop(flats, losses, alpha, lr):
  """Updates and final weights from the paper: w(t) weights the update,
  then one SGD step on L_grad = sum |w_i ||grad_W l_i|| - mean(G) r_i^alpha|
  (target constant), renormalised to sum T."""
  torch = pytest.importorskip("torch")
  t = flats[0].shape[0]
  w = np.ones(t)
  l0 = None
  outs = []
  for f, l in zip(flats, losses):
    outs.append(w @ f)
    l0 = l if l0 is None else l0
    wt = torch.tensor(w, requires_grad=True)
    norms = torch.tensor(np.linalg.norm(f[:, LAYER], axis=1))
    g = wt * norms
    lt = torch.tensor(l / l0)
    r = lt / lt.mean()
    target = (g.mean() * r**alpha).detach()
    (grad,) = torch.autograd.grad((g - target).abs().sum(), wt)
    w = np.maximum(w - lr * grad.numpy(), 0.0)
    w = t * w / w.sum()
  return outs, w


@pytest.mark.extras
@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_gradnorm_matches_paper_loop(alpha):
  rng = np.random.default_rng(0)
  t, lr, n = 3, 0.05, 6
  flats = [rand_grads(rng, t) for _ in range(n)]
  losses = [rng.uniform(0.5, 2.0, t) * 0.9**k for k in range(n)]
  ref_outs, ref_w = gradnorm_loop(flats, losses, alpha, lr)
  tx = m.gradnorm(alpha, lr, num_tasks=t, leaves=only_a)
  with jax.enable_x64(True):
    state = tx.init({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
    for f, l, ref in zip(flats, losses, ref_outs):
      u, state = jax.jit(tx.update)(stacked10(f), state, task_losses=jnp.asarray(l))
      np.testing.assert_allclose(flat10(u), ref, rtol=1e-9)
    np.testing.assert_allclose(state.weights, ref_w, rtol=1e-9)
    np.testing.assert_allclose(float(jnp.sum(state.weights)), t, rtol=1e-12)


def test_gradnorm_reads_only_the_chosen_leaves():
  """Changing the gradients outside W does not change the learnt weights."""
  rng = np.random.default_rng(1)
  t = 3
  f = rand_grads(rng, t)
  f2 = f.copy()
  f2[:, 6:] *= 100.0
  l = jnp.asarray(rng.uniform(0.5, 2.0, t))
  tx = m.gradnorm(1.5, 0.1, num_tasks=t, leaves=only_a)
  states = []
  for g in (f, f2):
    state = tx.init(None)
    _, state = tx.update(stacked10(g, jnp.float32), state, task_losses=l)
    _, state = tx.update(stacked10(g, jnp.float32), state, task_losses=0.5 * l)
    states.append(np.asarray(state.weights))
  np.testing.assert_allclose(states[0], states[1], rtol=1e-6)
  assert not np.allclose(states[0], 1.0)


def test_gradnorm_leaf_selection_errors_and_queries():
  t = 2
  g = stacked10(np.ones((t, 10)), jnp.float32)
  l = jnp.ones(t)
  tx = m.gradnorm(num_tasks=t, leaves=lambda p: "nothing" in p)
  with pytest.raises(ValueError, match="matches none"):
    tx.update(g, tx.init(None), task_losses=l)
  tx = m.gradnorm(num_tasks=t, leaves=only_a)
  w, _ = gj.task_weights(tx, g, tx.init(None), task_losses=l)
  np.testing.assert_allclose(w, [1.0, 1.0])
  with pytest.raises(ValueError, match="subset"):
    gj.task_weights(tx, None, tx.init(None), task_losses=l, gram=jnp.eye(t))
  with pytest.raises(ValueError, match="leaves"):
    m.gradnorm(num_tasks=t, leaves="a")
  # leaves=None: the norms of the full task gradients; a Gram matrix suffices
  tx = m.gradnorm(1.5, 0.1, num_tasks=t)
  w, state = gj.task_weights(
    tx, None, tx.init(None), task_losses=l, gram=jnp.diag(jnp.array([9.0, 1.0]))
  )
  np.testing.assert_allclose(state.weights, [2 * 0.7 / 1.8, 2 * 1.1 / 1.8], rtol=1e-6)


def test_gradnorm_injectable():
  tx = optax.inject_hyperparams(m.gradnorm, static_args=("leaves",))(
    alpha=1.5, lr=0.1, num_tasks=2, leaves=only_a
  )
  g = stacked10(np.ones((2, 10)) * np.array([[3.0], [1.0]]), jnp.float32)
  state = tx.init(None)
  _, state = jax.jit(tx.update)(g, state, task_losses=jnp.ones(2))
  w = state.inner_state.weights
  assert float(w[0]) < 1.0 < float(w[1])
  state.hyperparams["lr"] = jnp.asarray(0.0)
  _, state2 = jax.jit(tx.update)(g, state, task_losses=jnp.ones(2))
  np.testing.assert_allclose(state2.inner_state.weights, w, rtol=1e-6)


def _lean_vs_update(method):
  def fun(p, x):
    h = jnp.tanh(x @ p["shared"])
    return jnp.stack([jnp.sum((h @ p["head"] - 1.0) ** 2), jnp.sum((h @ p["head"] + 0.5) ** 2)])

  p = {"shared": jnp.eye(3) * 0.5 + 0.1, "head": jnp.ones((3,))}
  x = jnp.arange(6.0).reshape(2, 3) / 6
  step = jax.jit(gj.combined_value_and_grad(fun, method))
  losses, grads, state = step(p, method.init(p), x)
  _, stacked = gj.per_task_value_and_grad(fun)(p, x)
  ref, ref_state = method.update(stacked, method.init(p), p, task_losses=losses)
  for a, b in zip(
    jax.tree_util.tree_leaves((grads, state)), jax.tree_util.tree_leaves((ref, ref_state))
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradnorm_lean_step_all_leaves():
  _lean_vs_update(m.gradnorm(1.5, 0.1, num_tasks=2))


def test_gradnorm_lean_step_leaf_subset():
  _lean_vs_update(m.gradnorm(1.5, 0.1, num_tasks=2, leaves=lambda path: "shared" in path))
