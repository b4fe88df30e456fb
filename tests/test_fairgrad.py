"""FairGrad (Ban and Ji, ICML 2024): the Newton solve against scipy on the
same system, torchjd's FairGrad, closed forms and the scale law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_method_helpers import rand_j, run, torch64

from gradcraft_jax.methods import fairgrad, fairgrad_weights


def scipy_weights(k, alpha, ridge=1e-6):
  """least_squares on (K/s + ridge I) w - w^(-1/alpha), rescaled: the same
  ridged system, solved by an independent method in float64."""
  from scipy.optimize import least_squares

  t = k.shape[0]
  s = np.max(np.diag(k))
  kh = k / s + ridge * np.eye(t)
  p = 1.0 / alpha
  res = least_squares(
    lambda w: kh @ w - w ** (-p),
    np.ones(t) / t,
    bounds=(1e-12, np.inf),
    xtol=1e-15,
    ftol=1e-15,
    gtol=1e-15,
    max_nfev=10000,
  )
  return res.x * s ** (-1.0 / (1.0 + p))


CASES = [(2, 0.5, 0), (4, 1.0, 1), (6, 2.0, 2), (10, 5.0, 3), (16, 2.0, 4)]


@pytest.mark.parametrize("t,alpha,seed", CASES)
def test_matches_scipy_on_the_same_system(t, alpha, seed):
  rng = np.random.default_rng(seed)
  j = rand_j(rng, t, t + 5, correlated=True)
  k = j @ j.T
  ref = scipy_weights(k, alpha)
  with jax.enable_x64(True):
    w64 = np.asarray(fairgrad_weights(jnp.asarray(k, jnp.float64), alpha=alpha))
  np.testing.assert_allclose(w64, ref, rtol=1e-10)
  w32 = np.asarray(fairgrad_weights(jnp.asarray(k, jnp.float32), alpha=alpha))
  np.testing.assert_allclose(w32, ref, rtol=1e-4)


@pytest.mark.extras
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_matches_torchjd(alpha):
  agg = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(5)
  j = rand_j(rng, 4, 12)
  ref = agg.FairGrad(alpha=alpha)(torch64(j)).numpy()
  # torchjd solves the unridged system with least_squares (tolerance 1e-8)
  (out,), _ = run(fairgrad(alpha, ridge=0.0), [j], jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-8 * np.abs(ref).max())


def test_orthogonal_closed_form_and_alpha_zero():
  j = np.diag([1.0, 2.0, 5.0])
  for alpha in (0.5, 1.0, 4.0):
    p = 1.0 / alpha
    w = np.diag(j) ** (-2.0 / (1.0 + p))  # w_i ||g_i||^2 = w_i^(-p)
    (out,), _ = run(fairgrad(alpha, ridge=0.0), [j], jnp.float64)
    np.testing.assert_allclose(out, w * np.diag(j), rtol=1e-10)
  (out,), _ = run(fairgrad(0.0), [j])
  np.testing.assert_allclose(out, j.mean(0), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_scale_law(alpha):
  """Gradients times c: the update scales by c^((1 - alpha) / (1 + alpha))."""
  rng = np.random.default_rng(6)
  j = rand_j(rng, 3, 8)
  c = 1e3
  (a,), _ = run(fairgrad(alpha), [j], jnp.float64)
  (b,), _ = run(fairgrad(alpha), [c * j], jnp.float64)
  np.testing.assert_allclose(b, a * c ** ((1 - alpha) / (1 + alpha)), rtol=1e-8)


def test_progress_is_fair_and_positive():
  """<g_i, d> = w_i^(-1/alpha) > 0 at the solution (independent gradients)."""
  rng = np.random.default_rng(7)
  j = rand_j(rng, 5, 9, correlated=True)
  with jax.enable_x64(True):
    w = np.asarray(fairgrad_weights(jnp.asarray(j @ j.T), alpha=2.0, ridge=0.0))
  d = w @ j
  np.testing.assert_allclose(j @ d, w ** (-0.5), rtol=1e-8)


def test_hyperparameters_validated_and_injectable():
  import optax

  with pytest.raises(ValueError, match="alpha"):
    fairgrad(-1.0)
  with pytest.raises(ValueError, match="num_iters"):
    fairgrad(num_iters=0)
  tx = optax.inject_hyperparams(fairgrad, static_args=("num_iters",))(alpha=2.0)
  j = np.diag([1.0, 4.0])
  (out,), _ = run(tx, [j])
  (ref,), _ = run(fairgrad(2.0), [j])
  np.testing.assert_allclose(out, ref, rtol=1e-6)
