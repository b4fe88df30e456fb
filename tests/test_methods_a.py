"""Part-A comparison methods against NumPy references written from the papers
(loops over tasks on the flattened gradient vectors), hand-checked values,
the guarantees of the math, and torchjd where it implements the method."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcraft_jax as gj
import gradcraft_jax.methods as m

# the package re-exports functions named like their modules
mgda_mod = sys.modules["gradcraft_jax.methods._mgda"]


def stacked(flat, dtype=jnp.float64):
  flat = np.asarray(flat)
  t = flat.shape[0]
  return {
    "a": jnp.asarray(flat[:, :6].reshape(t, 2, 3), dtype),
    "b": jnp.asarray(flat[:, 6:], dtype),
  }


def flat_of(tree):
  return np.concatenate(
    [np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"], np.float64).ravel()]
  )


def rand_grads(rng, t, d=10, spread=1.0):
  return rng.standard_normal((t, d)) * 10.0 ** rng.uniform(-spread, spread, (t, 1))


def update_of(tx, flats, losses=None, dtype=jnp.float64):
  """Runs ``tx`` over a list of (T, d) gradients; returns flat updates, state
  (in float64 with x64 enabled for ``dtype=float64``)."""
  with jax.enable_x64(dtype == jnp.float64):
    state = tx.init({"a": jnp.zeros((2, 3), dtype), "b": jnp.zeros(4, dtype)})
    outs = []
    for i, f in enumerate(flats):
      kw = {} if losses is None else {"task_losses": jnp.asarray(losses[i], dtype)}
      u, state = jax.jit(tx.update)(stacked(f, dtype), state, **kw)
      outs.append(flat_of(u))
    state = jax.tree_util.tree_map(np.asarray, state)
  return outs, state


# ---------------------------------------------------------------- references


def pcgrad_np(g, perms):
  t = len(g)
  out = []
  for i in range(t):
    v = g[i].copy()
    for j in perms[i]:
      if j == i:
        continue
      inner = v @ g[j]
      if inner < 0 and g[j] @ g[j] > 0:
        v = v - inner / (g[j] @ g[j]) * g[j]
    out.append(v)
  return np.sum(out, axis=0)


def pcgrad_plus_np(g, perms, tau, eps):
  t = len(g)
  norms = np.linalg.norm(g, axis=1)
  top = norms.max()
  hat = np.array(
    [(tau * top / norms[i] + 1 - tau) * g[i] if norms[i] > 0 else g[i] for i in range(t)]
  )
  hn = np.linalg.norm(hat, axis=1)
  out = []
  for i in range(t):
    v = hat[i].copy()
    for j in perms[i]:
      if j == i:
        continue
      inner = v @ hat[j]
      if inner < 0 and hn[j] > 0:
        v = v + (eps * hn[i] * hn[j] - inner) / hn[j] ** 2 * hat[j]
    out.append(v)
  return np.mean(out, axis=0)


def gradvac_np(g, phi, perms, beta):
  t = len(g)
  phi = phi.copy()
  out = []
  for i in range(t):
    v = g[i].copy()
    for j in perms[i]:
      if j == i:
        continue
      nv, nj = np.linalg.norm(v), np.linalg.norm(g[j])
      cos = v @ g[j] / (nv * nj)
      hat = phi[i, j]
      if cos < hat:
        v = (
          v
          + nv
          * (hat * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - hat**2))
          / (nj * np.sqrt(1 - hat**2))
          * g[j]
        )
      phi[i, j] = (1 - beta) * hat + beta * cos
    out.append(v)
  return np.sum(out, axis=0), phi


def imtl_g_np(g):
  """The paper's closed form with D and U (rows g_1 - g_i, u_1 - u_i)."""
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = g[0] - g[1:]
  uu = u[0] - u[1:]
  alpha_rest = g[0] @ uu.T @ np.linalg.inv(d @ uu.T)
  alpha = np.concatenate([[1 - alpha_rest.sum()], alpha_rest])
  return alpha @ g, alpha


def mgda_fw_np(g, iters=20000):
  """Algorithm 2 of Sener and Koltun on the vectors (many iterations)."""
  t = len(g)
  w = np.full(t, 1.0 / t)
  for _ in range(iters):
    v = w @ g
    j = np.argmin(g @ v)
    a, b, c = v @ g[j], v @ v, g[j] @ g[j]
    if c <= a:
      gamma = 1.0
    elif b <= a:
      gamma = 0.0
    else:
      gamma = (b - a) / (b + c - 2 * a)
    w = (1 - gamma) * w
    w[j] += gamma
  return w @ g


# ---------------------------------------------------------------- mean, UW, DWA


def test_mean_is_mean():
  g = np.random.default_rng(0).standard_normal((3, 10))
  (u,), _ = update_of(m.mean(), [g])
  np.testing.assert_allclose(u, g.mean(0), rtol=1e-12)


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
    sys.modules["gradcraft_jax.methods._uncertainty"].uncertainty_log_var_step(s, l, 0.1),
    s - 0.1 * grad,
    rtol=1e-6,
  )


def test_dwa_matches_loop():
  rng = np.random.default_rng(2)
  t, temp = 4, 1.5
  flats = [rand_grads(rng, t) for _ in range(5)]
  losses = [rng.uniform(0.1, 3.0, t) for _ in range(5)]
  outs, _ = update_of(m.dwa(temp, num_tasks=t), flats, losses)
  hist = []
  for f, l, u in zip(flats, losses, outs):
    if len(hist) < 2:
      w = np.ones(t)
    else:
      r = hist[-1] / hist[-2]
      e = np.exp(r / temp)
      w = t * e / e.sum()
    np.testing.assert_allclose(u, w @ f, rtol=1e-10)
    hist.append(l)


# ---------------------------------------------------------------- MGDA


def test_mgda_hand_checked():
  # two orthogonal unit vectors: the midpoint
  (u,), _ = update_of(m.mgda(), [np.eye(2, 10)])
  np.testing.assert_allclose(u[:2], [0.5, 0.5], atol=1e-12)
  # g3 = (1, 1)/2 lies inside the hull of e1, e2 and is the min-norm point
  g = np.zeros((3, 10))
  g[0, 0], g[1, 1], g[2, :2] = 1, 1, [0.5, 0.5]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u[:2], [0.5, 0.5], atol=1e-12)
  # one gradient is the min-norm point (the other projects beyond it)
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 0], [2, 1]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u[:2], [1, 0], atol=1e-12)
  # opposite gradients: the origin
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 2], [-3, -6]
  (u,), _ = update_of(m.mgda(), [g])
  np.testing.assert_allclose(u, 0, atol=1e-12)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 8), d=st.integers(2, 10))
def test_mgda_kkt_float64(seed, t, d):
  """The min-norm point v of the hull satisfies <v, g_i> >= ||v||^2, with
  equality on the support of the weights."""
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t, d)
  if seed % 3 == 0:
    g[1] = -2.0 * g[0]
  with jax.enable_x64(True):
    w = np.asarray(mgda_mod.mgda_weights(jnp.asarray(g @ g.T)))
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
  v = w @ g
  scale = np.max(np.sum(g * g, 1))
  slack = (g @ v - v @ v) / scale
  assert np.all(slack >= -1e-9), slack
  assert np.all(np.abs(slack[w > 1e-9]) <= 1e-9), slack


@pytest.mark.parametrize("seed", range(4))
def test_mgda_matches_frank_wolfe_reference(seed):
  """Against the paper's Frank-Wolfe (Algorithm 2) run for many iterations:
  FW converges sublinearly, so the library's exact solver must be at least
  as good in objective and close to it."""
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, 4, 10)
  (u,), _ = update_of(m.mgda(), [g])
  ref = mgda_fw_np(g)
  assert u @ u <= ref @ ref + 1e-12
  np.testing.assert_allclose(u, ref, atol=1e-3 * np.abs(g).max())


def test_mgda_matches_cvxpy():
  cp = pytest.importorskip("cvxpy")
  rng = np.random.default_rng(5)
  for _ in range(5):
    g = rand_grads(rng, 5, 8)
    x = cp.Variable(5)
    cp.Problem(cp.Minimize(cp.sum_squares(g.T @ x)), [x >= 0, cp.sum(x) == 1]).solve()
    (u,), _ = update_of(m.mgda(), [g])
    np.testing.assert_allclose(u, g.T @ x.value, atol=1e-5 * np.abs(g).max())


# ---------------------------------------------------------------- PCGrad


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 7))
def test_pcgrad_weights_match_reference(seed, t):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t)
  perms = np.stack([rng.permutation(t) for _ in range(t)])
  with jax.enable_x64(True):
    w = np.asarray(m.pcgrad_weights(jnp.asarray(g @ g.T), jnp.asarray(perms)))
  np.testing.assert_allclose(w @ g, pcgrad_np(g, perms), atol=1e-10 * np.abs(g).max())


def test_pcgrad_update_uses_state_key():
  """The transform draws its orders from the key in the state, exactly as
  ``task_permutations`` does."""
  common = sys.modules["gradcraft_jax.methods._common"]
  rng = np.random.default_rng(3)
  t = 5
  flats = [rand_grads(rng, t) for _ in range(3)]
  outs, state = update_of(m.pcgrad(seed=7), flats)
  key = jax.random.PRNGKey(7)
  for f, u in zip(flats, outs):
    key, perms = common.task_permutations(key, t)
    np.testing.assert_allclose(u, pcgrad_np(f, np.asarray(perms)), atol=1e-10 * np.abs(f).max())
  np.testing.assert_array_equal(state.key, key)


def test_pcgrad_hand_checked():
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 0], [-1, 1]
  (u,), _ = update_of(m.pcgrad(), [g])
  # g1 -> (1,0) - (-1)/2 (-1,1) = (0.5, 0.5); g2 -> (-1,1) + (1,0) = (0, 1)
  np.testing.assert_allclose(u[:2], [0.5, 1.5], atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(2, 7),
  tau=st.sampled_from([0.0, 0.3, 1.0]),
  eps=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_pcgrad_plus_weights_match_reference(seed, t, tau, eps):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t)
  perms = np.stack([rng.permutation(t) for _ in range(t)])
  with jax.enable_x64(True):
    w = np.asarray(
      m.pcgrad_plus_weights(jnp.asarray(g @ g.T), jnp.asarray(perms), tau=tau, eps=eps)
    )
  np.testing.assert_allclose(
    w @ g, pcgrad_plus_np(g, perms, tau, eps), atol=1e-9 * np.abs(g).max() * 10**1
  )


def test_pcgrad_plus_two_tasks_hits_target():
  """For T = 2 each projected gradient ends exactly at the eps target."""
  rng = np.random.default_rng(4)
  g = np.array([[1.0, 0.2, 0.0], [-0.9, 0.5, 0.3]])
  tau, eps = 0.5, 0.2
  norms = np.linalg.norm(g, axis=1)
  s = tau * norms.max() / norms + 1 - tau
  hat = s[:, None] * g
  with jax.enable_x64(True):
    w = np.asarray(
      m.pcgrad_plus_weights(jnp.asarray(g @ g.T), jnp.array([[0, 1], [1, 0]]), tau=tau, eps=eps)
    )
  # sum of projected = T * update; solve the two projected rows by hand
  hn = np.linalg.norm(hat, axis=1)
  p0 = hat[0] + (eps * hn[0] * hn[1] - hat[0] @ hat[1]) / hn[1] ** 2 * hat[1]
  p1 = hat[1] + (eps * hn[0] * hn[1] - hat[0] @ hat[1]) / hn[0] ** 2 * hat[0]
  np.testing.assert_allclose(p0 @ hat[1], eps * hn[0] * hn[1])
  np.testing.assert_allclose(w @ g, (p0 + p1) / 2, rtol=1e-12)
  del rng


def test_pcgrad_plus_reduces_to_pcgrad_over_t():
  rng = np.random.default_rng(6)
  g = rand_grads(rng, 4)
  perms = jnp.asarray(np.stack([rng.permutation(4) for _ in range(4)]))
  with jax.enable_x64(True):
    k = jnp.asarray(g @ g.T)
    np.testing.assert_allclose(
      m.pcgrad_plus_weights(k, perms, tau=0.0, eps=0.0), m.pcgrad_weights(k, perms) / 4, rtol=1e-12
    )


# ---------------------------------------------------------------- GradVac


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 6), beta=st.sampled_from([0.0, 0.3, 1.0]))
def test_gradvac_weights_match_reference(seed, t, beta):
  rng = np.random.default_rng(seed)
  phi = np.clip(rng.uniform(-0.5, 0.9, (t, t)), -1, 1)
  g = rand_grads(rng, t)
  perms = np.stack([rng.permutation(t) for _ in range(t)])
  with jax.enable_x64(True):
    w, new_phi = m.gradvac_weights(
      jnp.asarray(g @ g.T), jnp.asarray(phi), jnp.asarray(perms), beta=beta
    )
  expected, expected_phi = gradvac_np(g, phi, perms, beta)
  np.testing.assert_allclose(np.asarray(w) @ g, expected, atol=1e-9 * np.abs(g).max())
  off = ~np.eye(t, dtype=bool)
  np.testing.assert_allclose(np.asarray(new_phi)[off], expected_phi[off], atol=1e-10)


def test_gradvac_reaches_target_for_two_tasks():
  g = np.array([[1.0, 0.0], [-0.5, 1.0]])
  phi = np.array([[0.0, 0.4], [0.4, 0.0]])
  with jax.enable_x64(True):
    w, _ = m.gradvac_weights(
      jnp.asarray(g @ g.T), jnp.asarray(phi), jnp.array([[0, 1], [1, 0]]), beta=0.5
    )
  # row 0 alone: target cosine 0.4 with g_1
  coef = np.asarray(w)
  # cos(g_0', g_1) where g_0' = g_0 + c g_1 and row 1 is unchanged (cos > 0.4?
  # no: cos(g_1, g_0) < 0.4 too); check both corrected rows through the NumPy
  # reference instead, then the target of the reference itself:
  expected, _ = gradvac_np(g, phi, [[0, 1], [1, 0]], 0.5)
  np.testing.assert_allclose(coef @ g, expected, rtol=1e-12)
  v0 = g[0] + (expected - g[0] - g[1] - (expected - g[0] - g[1]))  # noqa
  nv = g[0].copy()
  cos = nv @ g[1] / np.linalg.norm(nv) / np.linalg.norm(g[1])
  hat = 0.4
  step = (
    np.linalg.norm(nv)
    * (hat * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - hat**2))
    / (np.linalg.norm(g[1]) * np.sqrt(1 - hat**2))
  )
  nv = nv + step * g[1]
  np.testing.assert_allclose(nv @ g[1] / np.linalg.norm(nv) / np.linalg.norm(g[1]), hat)


def test_gradvac_state_evolves_like_reference():
  rng = np.random.default_rng(8)
  t = 3
  common = sys.modules["gradcraft_jax.methods._common"]
  flats = [rand_grads(rng, t) for _ in range(3)]
  outs, state = update_of(m.gradvac(0.4, seed=3, num_tasks=t), flats)
  key, phi = jax.random.PRNGKey(3), np.zeros((t, t))
  for f, u in zip(flats, outs):
    key, perms = common.task_permutations(key, t)
    exp, phi = gradvac_np(f, phi, np.asarray(perms), 0.4)
    np.testing.assert_allclose(u, exp, atol=1e-9 * np.abs(f).max())
  off = ~np.eye(t, dtype=bool)
  np.testing.assert_allclose(np.asarray(state.phi)[off], phi[off], atol=1e-10)


# ---------------------------------------------------------------- IMTL


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 6))
def test_imtl_g_matches_paper_formula(seed, t):
  rng = np.random.default_rng(seed)
  g = rand_grads(rng, t, d=10)
  expected, alpha = imtl_g_np(g)
  with jax.enable_x64(True):
    w = np.asarray(m.imtl_g_weights(jnp.asarray(g @ g.T)))
  np.testing.assert_allclose(w, alpha, rtol=1e-7, atol=1e-9)
  # equal projections on every unit gradient
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  proj = u @ (w @ g)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-7)


def test_imtl_g_degenerate():
  """Opposite gradients of equal norm: n is orthogonal to the range of K,
  no combination has equal projections, the weights are 0. (With unequal
  norms the pseudo-inverse gives the least-squares weights, like torchjd.)"""
  g = np.zeros((2, 10))
  g[0, :2], g[1, :2] = [1, 1], [-1, -1]
  (u,), _ = update_of(m.imtl_g(), [g])
  np.testing.assert_allclose(u, 0.0, atol=1e-12)


def test_imtl_matches_loop():
  rng = np.random.default_rng(9)
  t, lr = 3, 0.2
  flats = [rand_grads(rng, t) for _ in range(3)]
  losses = [rng.uniform(0.2, 2.0, t) for _ in range(3)]
  outs, state = update_of(m.imtl(lr, num_tasks=t), flats, losses)
  s = np.zeros(t)
  for f, l, u in zip(flats, losses, outs):
    expected, _ = imtl_g_np(np.exp(s)[:, None] * f)
    np.testing.assert_allclose(u, expected, rtol=1e-7, atol=1e-9 * np.abs(f).max())
    s = s - lr * (np.exp(s) * l - 1.0)
  np.testing.assert_allclose(state.log_scales, s, rtol=1e-10)


# ---------------------------------------------------------------- homogeneity


@pytest.mark.parametrize(
  "name,factory",
  [
    ("mean", lambda: m.mean()),
    ("mgda", lambda: m.mgda()),
    ("pcgrad", lambda: m.pcgrad()),
    ("pcgrad_plus", lambda: m.pcgrad_plus(0.5, 0.1)),
    ("gradvac", lambda: m.gradvac(num_tasks=3)),
    ("imtl_g", lambda: m.imtl_g()),
  ],
)
def test_positively_homogeneous_float32(name, factory):
  """Scaling all gradients by c scales the update by c (1e-10..1e10)."""
  g = np.random.default_rng(10).standard_normal((3, 10))
  (base,), _ = update_of(factory(), [g], dtype=jnp.float32)
  for c in [1e-10, 1e10]:
    (u,), _ = update_of(factory(), [c * g], dtype=jnp.float32)
    np.testing.assert_allclose(u / c, base, rtol=2e-4, atol=1e-5 * np.abs(base).max())


def test_hyperparameter_validation():
  for bad in [
    lambda: m.pcgrad_plus(tau=1.5),
    lambda: m.pcgrad_plus(eps=-1),
    lambda: m.gradvac(beta=2.0, num_tasks=2),
    lambda: m.dwa(0.0, num_tasks=2),
    lambda: m.imtl(-1, num_tasks=2),
    lambda: m.uncertainty_weighting(-1, num_tasks=2),
    lambda: m.mgda(max_iters=0),
    lambda: m.dwa(num_tasks=0),
    lambda: m.gradvac(num_tasks=None),
  ]:
    with pytest.raises(ValueError):
      bad()


def test_top_level_exports():
  for name in [
    "mean",
    "uncertainty_weighting",
    "dwa",
    "mgda",
    "pcgrad",
    "pcgrad_plus",
    "gradvac",
    "imtl_g",
    "imtl",
  ]:
    assert getattr(gj, name) is getattr(m, name)


# ---------------------------------------------------------------- torchjd


def _identity_randperm(monkeypatch, torch):
  real = torch.randperm

  def fake(n, *args, **kwargs):
    return torch.arange(n)

  monkeypatch.setattr(torch, "randperm", fake)
  return real


@pytest.mark.torchjd
def test_torchjd_mgda_imtlg_mean(monkeypatch):
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  rng = np.random.default_rng(11)
  for t in [2, 3, 5]:
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    ref_mgda = agg.MGDA(epsilon=1e-12, max_iters=20000)(j).numpy()
    (u,), _ = update_of(m.mgda(), [g])
    np.testing.assert_allclose(u, ref_mgda, atol=1e-5 * np.abs(g).max())
    (u,), _ = update_of(m.imtl_g(), [g])
    np.testing.assert_allclose(u, agg.IMTLG()(j).numpy(), rtol=1e-7, atol=1e-9 * np.abs(g).max())
    (u,), _ = update_of(m.mean(), [g])
    np.testing.assert_allclose(u, agg.Mean()(j).numpy(), rtol=1e-12)


@pytest.mark.torchjd
@pytest.mark.parametrize("t", [2, 4])
def test_torchjd_pcgrad_gradvac_fixed_order(monkeypatch, t):
  """torchjd draws its orders with torch.randperm: fix them to the identity
  and compare with identity orders here (sum convention in both)."""
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  _identity_randperm(monkeypatch, torch)
  rng = np.random.default_rng(12 + t)
  perms = jnp.tile(jnp.arange(t), (t, 1))
  tj_gradvac = agg.GradVac(beta=0.5, eps=0.0)
  phi = jnp.zeros((t, t))
  for _ in range(3):
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    with jax.enable_x64(True):
      k = jnp.asarray(g @ g.T)
      w = np.asarray(m.pcgrad_weights(k, perms))
      np.testing.assert_allclose(w @ g, agg.PCGrad()(j).numpy(), atol=1e-10 * np.abs(g).max())
      wv, phi = m.gradvac_weights(k, phi, perms, beta=0.5)
      np.testing.assert_allclose(
        np.asarray(wv) @ g, tj_gradvac(j).numpy(), atol=1e-9 * np.abs(g).max()
      )
