"""Tests of NMT (Cheng et al., AAAI 2025): the multiplier rule and the update."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradcraft_jax import per_task_value_and_grad
from gradcraft_jax.methods._nmt import NMTState, nmt, nmt_loss, nmt_update_multipliers, nmt_weights


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  return jax.experimental.enable_x64()  # older JAX


# ---------------------------------------------------------------- reference


def _ref_run(losses, grads, targets, lr, clip, lam0):
  """Plain NumPy loop, written from the paper / reference implementation.

  losses: (S, T); grads: (S, T, d) flattened task gradients; targets:
  (S, T-1). Returns the multiplier trajectory (S, T-1) and updates (S, d).
  """
  steps, t = losses.shape
  lam = [float(lam0)] * (t - 1)
  lams, updates = [], []
  for s in range(steps):
    for i in range(t - 1):
      diff = min(max(losses[s, i] - targets[s, i], -1.0), 1.0)
      lam[i] = min(max(lam[i] + lr * diff, 0.0), clip)
    num = np.array(grads[s, t - 1], np.float64)
    for i in range(t - 1):
      num = num + lam[i] * grads[s, i]
    updates.append(num / (1.0 + sum(lam)))
    lams.append(list(lam))
  return np.array(lams), np.array(updates)


def _stack(flat, dtype):
  """(T, 10) flat rows -> a two-leaf stacked pytree."""
  t = flat.shape[0]
  return {
    "w": jnp.asarray(flat[:, :6].reshape(t, 3, 2), dtype),
    "b": jnp.asarray(flat[:, 6:], dtype),
  }


def _flat(tree):
  return np.concatenate([np.asarray(tree["w"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
@pytest.mark.parametrize("override", [False, True])
@pytest.mark.parametrize("x64", [False, True])
def test_matches_numpy_reference(num_tasks, override, x64):
  rng = np.random.default_rng(num_tasks + 10 * override)
  steps, d = 50, 10
  lr, clip, lam0 = 0.3, 2.5, 0.2
  # Losses around the targets so that multipliers move both ways and hit
  # both clip bounds; some violations exceed the inner clip of +-1.
  base = rng.uniform(0.5, 2.0, num_tasks - 1)
  drift = np.where(np.arange(steps) < 20, 0.8, -0.8)[:, None]
  drift[40:] = 0.0
  losses = np.concatenate(
    [base + drift + rng.normal(0.0, 1.0, (steps, num_tasks - 1)), rng.uniform(0, 3, (steps, 1))],
    axis=1,
  )
  grads = rng.normal(size=(steps, num_tasks, d))
  if override:
    targets = base + rng.normal(0.0, 0.3, (steps, num_tasks - 1))
  else:
    targets = np.broadcast_to(base, (steps, num_tasks - 1))
  ref_lam, ref_upd = _ref_run(losses, grads, targets, lr, clip, lam0)
  assert ref_lam.min() == 0.0 and ref_lam.max() == clip  # both bounds hit

  ctx = _x64() if x64 else contextlib.nullcontext()
  with ctx:
    dtype = jnp.float64 if x64 else jnp.float32
    tx = nmt(list(base), lagrange_lr=lr, lagrange_clip=clip, init_multiplier=lam0)
    state = tx.init({"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros(4, dtype)})
    assert state.multipliers.dtype == dtype
    update = jax.jit(tx.update)
    for s in range(steps):
      kw = {"targets": jnp.asarray(targets[s], dtype)} if override else {}
      upd, state = update(
        _stack(grads[s], dtype), state, task_losses=jnp.asarray(losses[s], dtype), **kw
      )
      assert upd["w"].dtype == dtype
      tol = dict(rtol=1e-12, atol=1e-12) if x64 else dict(rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(np.asarray(state.multipliers), ref_lam[s], **tol)
      np.testing.assert_allclose(_flat(upd), ref_upd[s], **tol)
    assert int(state.count) == steps


def test_update_multipliers_and_weights_match_reference():
  rng = np.random.default_rng(0)
  lam = rng.uniform(0, 1, 3)
  losses = rng.normal(size=4) * 2
  targets = rng.normal(size=3)
  want = np.clip(lam + 0.7 * np.clip(losses[:3] - targets, -1, 1), 0, 1.5)
  got = nmt_update_multipliers(
    jnp.asarray(lam), jnp.asarray(losses), jnp.asarray(targets), lagrange_lr=0.7, lagrange_clip=1.5
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  w = nmt_weights(jnp.asarray(lam))
  np.testing.assert_allclose(np.asarray(w), np.append(lam, 1) / (1 + lam.sum()), rtol=1e-6)


# --------------------------------------------------------------- properties


@settings(deadline=None, max_examples=30)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(2, 5),
  lr=st.floats(0.0, 5.0),
  clip=st.floats(0.0, 10.0),
  frac=st.floats(0.0, 1.0),
)
def test_multipliers_stay_in_range(seed, t, lr, clip, frac):
  rng = np.random.default_rng(seed)
  lam = jnp.full((t - 1,), frac * clip, jnp.float32)
  for _ in range(20):
    losses = jnp.asarray(rng.normal(0, 3, t), jnp.float32)
    targets = jnp.asarray(rng.normal(0, 3, t - 1), jnp.float32)
    lam = nmt_update_multipliers(lam, losses, targets, lagrange_lr=lr, lagrange_clip=clip)
    lam_np = np.asarray(lam)
    assert np.all(lam_np >= 0.0) and np.all(lam_np <= np.float32(clip))


@settings(deadline=None, max_examples=25)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(2, 4),
  lr=st.floats(0.05, 2.0),
  clip=st.floats(0.1, 5.0),
  margin=st.floats(0.01, 3.0),
)
def test_satisfied_constraints_decay_to_objective_gradient(seed, t, lr, clip, margin):
  rng = np.random.default_rng(seed)
  targets = rng.uniform(0, 2, t - 1)
  tx = nmt(list(targets), lagrange_lr=lr, lagrange_clip=clip, init_multiplier=clip)
  state = tx.init({"w": jnp.zeros(5)})
  # Each step lowers every multiplier by lr * min(margin, 1) at least.
  n = int(np.ceil(clip / (lr * min(margin, 1.0)))) + 1
  prev = np.asarray(state.multipliers)
  for _ in range(n):
    losses = np.append(targets - margin - rng.uniform(0, 1, t - 1), rng.uniform(0, 5))
    g = {"w": jnp.asarray(rng.normal(size=(t, 5)), jnp.float32)}
    upd, state = tx.update(g, state, task_losses=jnp.asarray(losses))
    cur = np.asarray(state.multipliers)
    assert np.all(cur <= prev)
    prev = cur
  assert np.all(prev == 0.0)
  np.testing.assert_array_equal(np.asarray(upd["w"]), np.asarray(g["w"][-1]))


@settings(deadline=None, max_examples=25)
@given(
  seed=st.integers(0, 2**31 - 1),
  lr=st.floats(0.05, 1.0),
  clip=st.floats(1.0, 20.0),
  excess=st.floats(0.01, 5.0),
)
def test_persistent_violation_grows_multiplier_and_alignment(seed, lr, clip, excess):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(3, 6))
  k = g @ g.T
  # The update's inner product with g_0 is a convex combination of
  # <g_2, g_0> and ||g_0||^2 moving towards the latter as lambda_0 grows, so
  # it grows whenever the objective does not already favour task 0 more
  # than task 0 itself.
  assume(k[0, 0] - k[0, 2] > 1e-3 * k[0, 0])
  targets = [1.0, 1.0]
  tx = nmt(targets, lagrange_lr=lr, lagrange_clip=clip)
  state = tx.init({"w": jnp.zeros(6)})
  gs = {"w": jnp.asarray(g, jnp.float32)}
  losses = jnp.asarray([1.0 + excess, 0.5, 3.0])  # task 0 violated only
  prev_lam, prev_dot = 0.0, float(k[0, 2])
  for _ in range(30):
    upd, state = tx.update(gs, state, task_losses=losses)
    lam = np.asarray(state.multipliers)
    dot = float(np.dot(np.asarray(upd["w"], np.float64), g[0]))
    assert lam[1] == 0.0
    if prev_lam < np.float32(clip):
      assert lam[0] > prev_lam
      assert dot > prev_dot - 1e-5 * abs(prev_dot)
    else:
      assert lam[0] == prev_lam
    prev_lam, prev_dot = lam[0], dot
  assert dot > float(k[0, 2])


# ---------------------------------------------------------- toy constrained


def _quadratics(a, b):
  def loss_fn(x, batch=None):
    del batch
    return jnp.stack([jnp.sum((x - a) ** 2), jnp.sum((x - b) ** 2)])

  return loss_fn


def test_toy_disc_constraint_reaches_closed_form_optimum():
  """min ||x-b||^2 s.t. ||x-a||^2 <= r^2: the optimum is the point of the
  disc closest to b, a + r (b-a)/||b-a||; the mean of the two gradients
  instead goes to the midpoint, which breaks the constraint."""
  a = jnp.array([0.0, 0.0])
  b = jnp.array([3.0, 4.0])  # ||b - a|| = 5
  r = 1.5
  x_star = np.asarray(a) + r * (np.asarray(b) - np.asarray(a)) / 5.0
  loss_fn = _quadratics(a, b)
  vg = per_task_value_and_grad(loss_fn)

  def train(tx, steps=3000):
    x = jnp.array(a)  # start of stage 2: stage 1's solution, l1 = 0
    state = tx.init(x)

    @jax.jit
    def step(x, state):
      losses, g = vg(x)
      upd, state = tx.update(g, state, x, task_losses=losses)
      return optax.apply_updates(x, upd), state, losses

    for _ in range(steps):
      x, state, _ = step(x, state)
    return x, state

  tx = optax.chain(nmt([r**2], lagrange_lr=0.01, lagrange_clip=50.0), optax.sgd(0.05))
  x, state = train(tx)
  l1, l2 = np.asarray(loss_fn(x))
  assert abs(l1 - r**2) < 0.02 * r**2
  np.testing.assert_allclose(np.asarray(x), x_star, atol=0.02)
  # KKT multiplier: x* = (b + lam a)/(1 + lam) => lam* = ||b-a||/r - 1.
  np.testing.assert_allclose(float(state[0].multipliers[0]), 5 / r - 1, rtol=0.05)
  assert l2 < np.sum((np.asarray(a) - np.asarray(b)) ** 2)  # secondary lower

  def mean_weighting():
    def update_fn(g, state, params=None, **kw):
      del params, kw
      return jax.tree_util.tree_map(lambda x: jnp.mean(x, 0), g), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

  x_mean, _ = train(optax.chain(mean_weighting(), optax.sgd(0.05)))
  l1_mean = float(loss_fn(x_mean)[0])
  np.testing.assert_allclose(l1_mean, 25 / 4, rtol=1e-3)  # the midpoint
  assert l1_mean > 2 * r**2  # the primary target is broken


# -------------------------------------------------------- the cheap path


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_nmt_loss_path_equals_transform_path(num_tasks):
  rng = np.random.default_rng(num_tasks)
  xs = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(32, num_tasks)), jnp.float32)
  params = {
    "w": jnp.asarray(rng.normal(size=(5, num_tasks)), jnp.float32),
    "b": jnp.zeros(num_tasks),
  }

  def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2, axis=0)

  targets = np.asarray(loss_fn(params, (xs, ys)))[:-1] * 0.5  # violated
  hp = dict(lagrange_lr=0.4, lagrange_clip=3.0)

  # Transform path: stacked per-task gradients.
  tx = optax.chain(nmt(list(targets), **hp), optax.adam(1e-2))
  p1, s1 = params, tx.init(params)
  # Cheap path: one scalar loss, multipliers advanced first, then adam.
  opt = optax.adam(1e-2)
  p2, s2 = params, opt.init(params)
  lam = jnp.zeros(num_tasks - 1)

  @jax.jit
  def cheap_step(p, s, lam, batch):
    def objective(p, lam):
      losses = loss_fn(p, batch)
      lam = nmt_update_multipliers(lam, losses, targets, **hp)
      return nmt_loss(losses, lam, targets), lam

    (_, lam), g = jax.value_and_grad(objective, has_aux=True)(p, lam)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, lam

  @jax.jit
  def tx_step(p, s, batch):
    losses, g = per_task_value_and_grad(loss_fn)(p, batch)
    upd, s = tx.update(g, s, p, task_losses=losses)
    return optax.apply_updates(p, upd), s

  for i in range(20):
    batch = (xs[i % 4 * 8 : (i % 4 + 1) * 8], ys[i % 4 * 8 : (i % 4 + 1) * 8])
    p1, s1 = tx_step(p1, s1, batch)
    p2, s2, lam = cheap_step(p2, s2, lam, batch)
    np.testing.assert_allclose(np.asarray(s1[0].multipliers), np.asarray(lam), rtol=1e-5, atol=1e-6)
    for k in params:
      np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-4, atol=1e-5)
  assert float(jnp.max(lam)) > 0


def test_nmt_loss_gradient_is_weighted_sum():
  x = jnp.array([0.3, -1.2, 2.0])

  def losses(x):
    return jnp.stack([jnp.sum(x**2), jnp.sum(jnp.sin(x)), jnp.sum(x)])

  lam = jnp.array([0.7, 1.9])
  targets = jnp.array([0.1, 0.2])
  g = jax.grad(lambda x: nmt_loss(losses(x), lam, targets))(x)
  jac = np.asarray(jax.jacrev(losses)(x))
  want = (jac[2] + 0.7 * jac[0] + 1.9 * jac[1]) / 3.6
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)
  # No gradient flows into multipliers or targets.
  gl = jax.grad(lambda m, t: nmt_loss(losses(x), m, t), argnums=(0, 1))(lam, targets)
  assert float(jnp.abs(gl[0]).sum() + jnp.abs(gl[1]).sum()) == 0.0


# ------------------------------------------------------- engineering


def _toy_problem():
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}

  def loss_fn(p):
    return jnp.mean((xs @ p["w"] - ys) ** 2, axis=0)

  return params, loss_fn


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, loss_fn = _toy_problem()
  targets = np.asarray(loss_fn(params))[:2] * 0.3
  tx = optax.chain(nmt(list(targets), lagrange_lr=0.2, lagrange_clip=4.0), optax.adam(1e-2))

  @jax.jit
  def step(p, s):
    losses, g = per_task_value_and_grad(loss_fn)(p)
    upd, s = tx.update(g, s, p, task_losses=losses)
    return optax.apply_updates(p, upd), s

  def run(p, s, n):
    for _ in range(n):
      p, s = step(p, s)
    return p, s

  p_full, s_full = run(params, tx.init(params), 12)
  p, s = run(params, tx.init(params), 7)
  assert isinstance(s[0], NMTState) and float(s[0].multipliers.max()) > 0

  # Host round trip.
  host = jax.device_get((p, s))
  p_h, s_h = run(*jax.tree_util.tree_map(np.asarray, host), 5)
  np.testing.assert_allclose(np.asarray(p_h["w"]), np.asarray(p_full["w"]), rtol=1e-6, atol=1e-7)

  # Orbax round trip.
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": p, "opt_state": s})
  ckpt.wait_until_finished()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"params": p, "opt_state": s})
  restored = ckpt.restore(path, abstract)
  ckpt.close()
  r_state = restored["opt_state"]
  assert isinstance(r_state[0], NMTState)
  np.testing.assert_array_equal(np.asarray(r_state[0].multipliers), np.asarray(s[0].multipliers))
  p_r, s_r = run(restored["params"], r_state, 5)
  np.testing.assert_allclose(np.asarray(p_r["w"]), np.asarray(p_full["w"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    np.asarray(s_r[0].multipliers), np.asarray(s_full[0].multipliers), rtol=1e-6
  )
  assert int(s_r[0].count) == int(s_full[0].count) == 12


def test_jit_does_not_retrace():
  params, loss_fn = _toy_problem()
  tx = optax.chain(nmt([0.1, 0.2], lagrange_lr=0.2, lagrange_clip=4.0), optax.adam(1e-2))
  traces = []

  @jax.jit
  def step(p, s, tgt):
    traces.append(1)
    losses, g = per_task_value_and_grad(loss_fn)(p)
    upd, s = tx.update(g, s, p, task_losses=losses, targets=tgt)
    return optax.apply_updates(p, upd), s

  p, s = params, tx.init(params)
  for i in range(6):
    p, s = step(p, s, jnp.array([0.1, 0.2]) * (1 + i))
  assert len(traces) == 1
  assert int(s[0].count) == 6


def test_inject_hyperparams():
  params, loss_fn = _toy_problem()
  tx = optax.inject_hyperparams(nmt)(
    targets=jnp.array([0.1, 0.2]), lagrange_lr=0.5, lagrange_clip=1.0
  )
  s = tx.init(params)
  losses, g = per_task_value_and_grad(loss_fn)(params)
  _, s = jax.jit(tx.update)(g, s, task_losses=losses)
  s.hyperparams["lagrange_clip"] = jnp.asarray(0.25)
  _, s = jax.jit(tx.update)(g, s, task_losses=losses)
  assert float(jnp.max(s.inner_state.multipliers)) <= 0.25


def test_validation_errors():
  g = {"w": jnp.ones((3, 2))}
  losses = jnp.ones(3)
  with pytest.raises(ValueError, match="targets"):
    nmt([], lagrange_lr=0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="targets"):
    nmt([[0.1, 0.2]], lagrange_lr=0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="targets"):
    nmt(0.1, lagrange_lr=0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="targets"):
    nmt([np.nan], lagrange_lr=0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="lagrange_lr"):
    nmt([0.1], lagrange_lr=-0.1, lagrange_clip=1.0)
  with pytest.raises(ValueError, match="lagrange_clip"):
    nmt([0.1], lagrange_lr=0.1, lagrange_clip=-1.0)
  with pytest.raises(ValueError, match="init_multiplier"):
    nmt([0.1], lagrange_lr=0.1, lagrange_clip=1.0, init_multiplier=-0.5)
  with pytest.raises(ValueError, match="init_multiplier"):
    nmt([0.1], lagrange_lr=0.1, lagrange_clip=1.0, init_multiplier=1.5)
  tx = nmt([0.1, 0.2], lagrange_lr=0.1, lagrange_clip=1.0)
  s = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(g, s)
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(g, s, task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update({"w": jnp.ones((2, 2))}, s, task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match="override"):
    tx.update(g, s, task_losses=losses, targets=jnp.ones(3))
  with pytest.raises(ValueError, match="override"):
    tx.update(g, s, task_losses=losses, targets=jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="task_losses"):
    nmt_loss(jnp.ones(3), jnp.ones(1), jnp.ones(1))
  with pytest.raises(ValueError, match="task_losses"):
    nmt_update_multipliers(
      jnp.ones(2), jnp.ones(2), jnp.ones(2), lagrange_lr=0.1, lagrange_clip=1.0
    )
  # Missing task_losses is also caught inside a chain.
  chained = optax.chain(nmt([0.1, 0.2], lagrange_lr=0.1, lagrange_clip=1.0), optax.adam(1e-3))
  with pytest.raises(ValueError, match="task_losses"):
    chained.update(g, chained.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)})


def test_non_finite_losses_propagate():
  tx = nmt([0.1], lagrange_lr=0.1, lagrange_clip=1.0)
  s = tx.init({"w": jnp.zeros(2)})
  upd, s = tx.update({"w": jnp.ones((2, 2))}, s, task_losses=jnp.array([jnp.nan, 1.0]))
  assert not np.all(np.isfinite(np.asarray(upd["w"])))
  upd, _ = tx.update(
    {"w": jnp.array([[1.0, jnp.inf], [1.0, 1.0]])},
    tx.init({"w": jnp.zeros(2)}),
    task_losses=jnp.array([5.0, 1.0]),
  )
  assert not np.all(np.isfinite(np.asarray(upd["w"])))
