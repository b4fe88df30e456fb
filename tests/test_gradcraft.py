"""GradCraft against a NumPy loop written from the paper, and its guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_gradcraft import gradcraft_numpy

import gradcraft_jax as gj

LEAF_SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]  # 36 parameters per task


def random_stacked(rng, t, shapes=LEAF_SHAPES, rank=None, dtype=np.float64, spread=0.0):
  """Stacked pytree with T tasks; task norms spread over 10**±spread."""
  d = sum(int(np.prod(s)) for s in shapes)
  if rank is None:
    flat = rng.standard_normal((t, d))
  else:  # strongly correlated, conflicting gradients from a low-rank basis
    flat = rng.standard_normal((t, rank)) @ rng.standard_normal((rank, d))
  flat *= 10.0 ** rng.uniform(-spread, spread, size=(t, 1))
  leaves, start = {}, 0
  for j, s in enumerate(shapes):
    n = int(np.prod(s))
    leaves[f"leaf{j}"] = flat[:, start : start + n].reshape((t,) + s).astype(dtype)
    start += n
  return leaves, flat


def flatten_update(tree):
  return np.concatenate(
    [np.asarray(tree[k], np.float64).ravel() for k in sorted(tree, key=lambda k: int(k[4:]))]
  )


def run(tx, stacked, state=None):
  state = tx.init(None) if state is None else state
  return jax.jit(tx.update)(stacked, state)


@pytest.mark.parametrize("seed", range(24))
def test_matches_numpy_reference_float64(seed):
  rng = np.random.default_rng(seed)
  t = int(rng.integers(2, 13))
  tau = float(rng.choice([0.0, 0.25, 0.5, 0.9, 1.0]))
  eps = float(rng.choice([0.0, 0.01, 0.1, 0.3]))
  rank = int(rng.integers(2, 6)) if seed % 2 else None
  with jax.enable_x64(True):
    stacked, flat = random_stacked(rng, t, rank=rank, spread=3.0)
    expected, g_hat, _ = gradcraft_numpy(flat, tau, eps, pinv="unit" if rank else False)
    update, _ = run(gj.gradcraft(tau, eps), jax.tree_util.tree_map(jnp.asarray, stacked))
    got = flatten_update(update)
    assert update["leaf0"].dtype == jnp.float64
  # the update can cancel to ~0: measure the error against the inputs' scale
  np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-10 * np.abs(g_hat).max())


@pytest.mark.parametrize("seed", range(12))
def test_matches_numpy_reference_float32(seed):
  rng = np.random.default_rng(100 + seed)
  t = int(rng.integers(2, 13))
  tau = float(rng.choice([0.0, 0.5, 1.0]))
  eps = float(rng.choice([0.0, 0.1]))
  stacked, flat = random_stacked(rng, t, dtype=np.float32, spread=2.0)
  expected, g_hat, _ = gradcraft_numpy(flat.astype(np.float32), tau, eps)
  update, _ = run(gj.gradcraft(tau, eps), stacked)
  assert update["leaf0"].dtype == jnp.float32
  got = flatten_update(update)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(g_hat).max())


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1.0, 1e6, 1e12])
def test_scales(scale):
  rng = np.random.default_rng(7)
  stacked, flat = random_stacked(rng, 5, dtype=np.float32, rank=3)
  stacked = jax.tree_util.tree_map(lambda x: x * np.float32(scale), stacked)
  expected, _, _ = gradcraft_numpy(flat * scale, 0.5, 0.1, pinv="unit")
  update, _ = run(gj.gradcraft(0.5, 0.1), stacked)
  got = flatten_update(update)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=5e-3, atol=5e-4 * np.abs(expected).max())


def test_zero_task_stays_zero_and_all_zero_gives_zero():
  rng = np.random.default_rng(3)
  stacked, flat = random_stacked(rng, 4)
  flat[2] = 0.0
  stacked = {k: v.copy() for k, v in stacked.items()}
  for v in stacked.values():
    v[2] = 0.0
  with jax.enable_x64(True):
    s, w = gj.methods.gradcraft_coefficients(gj.gram_matrix(stacked), tau=1.0, eps=0.2)
    assert np.all(np.isfinite(s)) and np.all(np.isfinite(w))
    # the zero task receives no projection and is never used as a direction
    assert np.all(np.asarray(w)[2] == 0) and np.all(np.asarray(w)[:, 2] == 0)
    update, _ = run(gj.gradcraft(1.0, 0.2), stacked)
    expected, _, _ = gradcraft_numpy(flat, 1.0, 0.2)
    np.testing.assert_allclose(flatten_update(update), expected, rtol=1e-9)
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), stacked)
  update, _ = run(gj.gradcraft(0.5, 0.1), zeros)
  for leaf in jax.tree_util.tree_leaves(update):
    assert np.all(np.asarray(leaf) == 0)


def test_duplicate_tasks_give_minimum_norm_solution():
  rng = np.random.default_rng(11)
  base = rng.standard_normal((3, 20))
  base[1] = -0.8 * base[0] + 0.3 * base[1]  # make conflicts likely
  flat = np.concatenate([base, base[1:2], base[1:2]])  # task 1 three times
  stacked = {"a": flat[:, :12].reshape(5, 3, 4), "b": flat[:, 12:]}
  with jax.enable_x64(True):
    k = gj.gram_matrix(stacked)
    s, w = gj.methods.gradcraft_coefficients(k, tau=0.5, eps=0.1)
    update, _ = run(gj.gradcraft(0.5, 0.1), stacked)
  expected, _, _ = gradcraft_numpy(flat, 0.5, 0.1, pinv="plain")
  got = np.concatenate([np.ravel(update["a"]), np.ravel(update["b"])])
  np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-10)
  # the coefficients on the three copies of task 1 are equal (minimum norm)
  w = np.asarray(w)
  for i in (0, 2):
    if w[i, 1] != 0:
      np.testing.assert_allclose(w[i, [1, 3, 4]], w[i, 1], rtol=1e-8)


def test_single_task_is_identity():
  g = {"w": jnp.array([[1.0, -2.0, 3.0]]), "b": jnp.array([[0.5]])}
  update, _ = run(gj.gradcraft(0.7, 0.3), g)
  np.testing.assert_allclose(update["w"], g["w"][0])
  np.testing.assert_allclose(update["b"], g["b"][0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
  rng = np.random.default_rng(5)
  stacked, flat = random_stacked(rng, 4, rank=3, dtype=np.float32)
  low = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), stacked)
  flat_low = np.concatenate(
    [np.asarray(low[f"leaf{j}"], np.float64).reshape(4, -1) for j in range(len(LEAF_SHAPES))],
    axis=1,
  )
  expected, _, _ = gradcraft_numpy(flat_low, 0.5, 0.1, pinv="unit")
  update, _ = run(gj.gradcraft(0.5, 0.1), low)
  assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(update))
  got = flatten_update(update)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=3e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_gives_non_finite_update(bad):
  rng = np.random.default_rng(9)
  stacked, _ = random_stacked(rng, 3, dtype=np.float32)
  stacked["leaf1"][1, 2] = bad
  update, _ = run(gj.gradcraft(0.5, 0.1), stacked)
  assert not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(update))
  # ... so that an apply_if_finite optimizer after it skips the step
  tx = optax.chain(gj.gradcraft(0.5, 0.1), optax.apply_if_finite(optax.sgd(0.1), 3))
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), stacked)
  updates, state = tx.update(stacked, tx.init(params), params)
  assert int(state[1].notfinite_count) == 1
  for leaf in jax.tree_util.tree_leaves(updates):
    assert np.all(np.asarray(leaf) == 0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(tau=-0.1, eps=0.0), "tau"),
    (dict(tau=1.5, eps=0.0), "tau"),
    (dict(tau=0.5, eps=-1e-3), "eps"),
    (dict(tau=float("nan"), eps=0.0), "tau"),
    (dict(tau=0.5, eps=0.0, norm_decay=1.0), "norm_decay"),
    (dict(tau=0.5, eps=0.0, norm_decay=0.9), "num_tasks"),
  ],
)
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gj.gradcraft(**kwargs)


def test_inconsistent_task_axes_name_the_leaf():
  g = {"dense": {"kernel": jnp.zeros((3, 2, 2)), "bias": jnp.zeros((4, 2))}}
  tx = gj.gradcraft(0.5, 0.1)
  with pytest.raises(ValueError, match=r"\['dense'\]\['(bias|kernel)'\]"):
    tx.update(g, tx.init(None))


def test_num_tasks_mismatch_raises():
  tx = gj.gradcraft(0.5, 0.1, norm_decay=0.9, num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx.update({"w": jnp.ones((4, 2))}, tx.init({"w": jnp.ones(2)}))


def test_inject_hyperparams_and_jit_without_retrace():
  rng = np.random.default_rng(0)
  stacked, flat = random_stacked(rng, 4, dtype=np.float32, rank=3)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), stacked)
  tx = optax.inject_hyperparams(gj.gradcraft)(tau=0.5, eps=0.1)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state, params)

  upd, state = step(stacked, state)
  expected, _, _ = gradcraft_numpy(flat, 0.5, 0.1, pinv="unit")
  np.testing.assert_allclose(
    flatten_update(upd), expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max()
  )
  state.hyperparams["tau"] = jnp.asarray(0.9, jnp.float32)
  state.hyperparams["eps"] = jnp.asarray(0.0, jnp.float32)
  upd, state = step(stacked, state)
  expected, _, _ = gradcraft_numpy(flat, 0.9, 0.0, pinv="unit")
  np.testing.assert_allclose(
    flatten_update(upd), expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max()
  )
  assert len(traces) == 1


def test_norm_decay_uses_moving_average_norms():
  rng = np.random.default_rng(21)
  tx = gj.gradcraft(0.8, 0.05, norm_decay=0.9, num_tasks=4)
  with jax.enable_x64(True):
    stacked, _ = random_stacked(rng, 4)
    state = tx.init(jax.tree_util.tree_map(lambda x: x[0], stacked))
    ema = np.zeros(4)
    update_fn = jax.jit(tx.update)
    for _ in range(5):
      stacked, flat = random_stacked(rng, 4, spread=1.0)
      ema = 0.9 * ema + 0.1 * np.linalg.norm(flat, axis=1)
      expected, _, _ = gradcraft_numpy(flat, 0.8, 0.05, norms=ema)
      upd, state = update_fn(stacked, state)
      np.testing.assert_allclose(np.asarray(state.norm_ema), ema, rtol=1e-10)
      np.testing.assert_allclose(flatten_update(upd), expected, rtol=1e-7)


def test_multisteps_accumulates_then_applies():
  rng = np.random.default_rng(4)
  stacked, flat = random_stacked(rng, 3, dtype=np.float32)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), stacked)
  # MultiSteps accumulates parameter-shaped updates: it goes after gradcraft
  tx = optax.chain(
    gj.gradcraft(0.5, 0.1),
    optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation(),
  )
  state = tx.init(params)
  upd1, state = tx.update(stacked, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(upd1))
  upd2, state = tx.update(stacked, state, params)
  expected, _, _ = gradcraft_numpy(flat, 0.5, 0.1)
  np.testing.assert_allclose(-flatten_update(upd2), expected, rtol=2e-3, atol=1e-5)


# ------------------------------------------------------------------ properties

PAD_WIDTH = 40
_coefficients = jax.jit(gj.methods.gradcraft_coefficients)


@jax.jit
def _update(stacked, tau, eps):
  tx = gj.gradcraft(tau, eps)  # traced hyperparameters: compiled once
  return tx.update(stacked, tx.init(None))[0]


def conflicting_matrices(min_t=2, max_t=8):
  @st.composite
  def build(draw):
    t = draw(st.integers(min_t, max_t))
    d = draw(st.integers(t + 2, 3 * t + 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rank = draw(st.integers(2, t + 1))
    flat = rng.standard_normal((t, rank)) @ rng.standard_normal((rank, d))
    flat *= 10.0 ** rng.uniform(-2, 2, size=(t, 1))
    # zero-pad to a fixed width: inner products are unchanged and the jitted
    # functions compile once per T only
    return np.pad(flat, ((0, 0), (0, PAD_WIDTH - d)))

  return build()


def tilde_from_coefficients(flat, tau, eps):
  k = gj.gram_matrix({"g": jnp.asarray(flat)})
  s, w = (np.asarray(x) for x in _coefficients(k, tau=tau, eps=eps))
  g_hat = s[:, None] * flat
  return g_hat, g_hat + w @ g_hat


@settings(deadline=None, max_examples=60)
@given(conflicting_matrices(), st.floats(0.0, 1.0), st.floats(0.0, 0.5))
def test_projection_hits_the_similarity_target(flat, tau, eps):
  with jax.enable_x64(True):
    g_hat, g_tilde = tilde_from_coefficients(flat, tau, eps)
  hat_norms = np.linalg.norm(g_hat, axis=1)
  h = g_hat @ g_hat.T
  for i in range(len(flat)):
    conflicts = np.flatnonzero(h[i] < 0)
    if len(conflicts) == 0:
      np.testing.assert_allclose(g_tilde[i], g_hat[i])
      continue
    # the conflicting set may be rank deficient: the target is then met in
    # the least-squares sense; check it where the system is full rank
    gi = g_hat[conflicts]
    if np.linalg.matrix_rank(gi, tol=1e-8 * hat_norms.max()) < len(conflicts):
      continue
    got = g_hat[conflicts] @ g_tilde[i]
    target = eps * hat_norms[i] * hat_norms[conflicts]
    np.testing.assert_allclose(got, target, rtol=1e-6, atol=1e-7 * hat_norms[i] * hat_norms.max())


@settings(deadline=None, max_examples=60)
@given(conflicting_matrices(), st.floats(0.01, 1.0))
def test_adjusted_norms_within_one_over_tau(flat, tau):
  with jax.enable_x64(True):
    g_hat, _ = tilde_from_coefficients(flat, tau, 0.0)
  norms = np.linalg.norm(g_hat, axis=1)
  assert norms.max() / norms.min() <= 1.0 / tau * (1 + 1e-9)


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**31 - 1), st.integers(3, 30), st.floats(0.0, 1.0))
def test_single_conflict_reduces_to_pcgrad(seed, d, tau):
  rng = np.random.default_rng(seed)
  g0 = rng.standard_normal(d)
  g1 = rng.standard_normal(d)
  if g0 @ g1 >= 0:
    g1 = g1 - 2 * (g0 @ g1) / (g0 @ g0) * g0  # reflect to force a conflict
  g1 *= 10 ** rng.uniform(-2, 2)
  if abs(g0 @ g1) < 1e-6 * np.linalg.norm(g0) * np.linalg.norm(g1):
    return
  flat = np.pad(np.stack([g0, g1]), ((0, 0), (0, PAD_WIDTH - d)))
  with jax.enable_x64(True):
    g_hat, g_tilde = tilde_from_coefficients(flat, tau, 0.0)
    update = _update({"g": jnp.asarray(flat)}, tau, 0.0)
  pc = [
    g_hat[i] - (g_hat[i] @ g_hat[1 - i]) / (g_hat[1 - i] @ g_hat[1 - i]) * g_hat[1 - i]
    for i in range(2)
  ]
  np.testing.assert_allclose(g_tilde, np.stack(pc), rtol=1e-8, atol=1e-10 * np.abs(g_hat).max())
  np.testing.assert_allclose(
    np.asarray(update["g"]), np.mean(pc, axis=0), rtol=1e-8, atol=1e-10 * np.abs(g_hat).max()
  )


# ------------------------------------------------------------------- training


def test_jitted_training_improves_every_task():
  """Three regression tasks on shared features, two of them in conflict."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 8)).astype(np.float32)
  w_true = rng.standard_normal((8, 3)).astype(np.float32)
  w_true[:, 1] = -0.7 * w_true[:, 0] + 0.3 * w_true[:, 1]
  y = x @ w_true + 0.05 * rng.standard_normal((256, 3)).astype(np.float32)
  params = {
    "shared": jnp.asarray(rng.standard_normal((8, 16)) * 0.3, jnp.float32),
    "heads": jnp.asarray(rng.standard_normal((16, 3)) * 0.3, jnp.float32),
  }

  def losses_fn(p, x, y):
    pred = jnp.tanh(x @ p["shared"]) @ p["heads"]
    return jnp.mean((pred - y) ** 2, axis=0)

  tx = optax.chain(gj.gradcraft(tau=0.5, eps=0.1), optax.adam(1e-2))
  opt_state = tx.init(params)
  grad_fn = gj.per_task_value_and_grad(losses_fn)

  @jax.jit
  def step(p, s):
    losses, g = grad_fn(p, x, y)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, losses

  first = np.asarray(losses_fn(params, x, y))
  for _ in range(300):
    params, opt_state, _ = step(params, opt_state)
  last = np.asarray(losses_fn(params, x, y))
  assert np.all(last < 0.5 * first), (first, last)
