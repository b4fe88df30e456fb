"""Aligned-MTL (Senushkin et al., CVPR 2023) against the SVD of J, the
orthogonality of the aligned gradients, and torchjd."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import apply, random_jacobian, torch_agg

from gradcraft_jax.methods import aligned_mtl, aligned_mtl_balance


def aligned_reference(j):
  """Senushkin et al.: J = U S V^T, aligned rows sigma_min U V^T, mean."""
  u, s, vt = np.linalg.svd(j, full_matrices=False)
  keep = s**2 > s[0] ** 2 * j.shape[0] * np.finfo(np.float32).eps
  u, s, vt = u[:, keep], s[keep], vt[keep]
  aligned = s.min() * u @ vt
  return aligned, aligned.mean(0)


@pytest.mark.parametrize("t,d", [(2, 5), (4, 10), (6, 40), (5, 3)])
def test_aligned_matches_reference(t, d):
  rng = np.random.default_rng(t * d)
  j = random_jacobian(rng, t, d, correlated=True)
  aligned, ref = aligned_reference(j)
  np.testing.assert_allclose(apply(aligned_mtl(), j), ref, atol=1e-4 * np.abs(ref).max())
  b = np.asarray(aligned_mtl_balance(jnp.asarray(j @ j.T, jnp.float32)))
  np.testing.assert_allclose(b @ j, aligned, atol=1e-4 * np.abs(aligned).max())


def test_aligned_gradients_orthogonal_equal_norms():
  rng = np.random.default_rng(5)
  j = random_jacobian(rng, 4, 20, correlated=True)
  b = np.asarray(aligned_mtl_balance(jnp.asarray(j @ j.T, jnp.float32)), np.float64)
  a = b @ j
  g = a @ a.T
  lam_min = np.linalg.eigvalsh(j @ j.T).min()
  np.testing.assert_allclose(g, lam_min * np.eye(4), atol=1e-4 * lam_min)


def test_aligned_hand_checked():
  # Rows (3, 0), (0, 1): aligned rows (1, 0), (0, 1); mean (1/2, 1/2).
  np.testing.assert_allclose(apply(aligned_mtl(), [[3.0, 0.0], [0.0, 1.0]]), [0.5, 0.5], atol=1e-6)
  # "rmse": sqrt(mean eigenvalue) = sqrt(5): rows (sqrt5, 0), (0, sqrt5).
  np.testing.assert_allclose(
    apply(aligned_mtl("rmse"), [[3.0, 0.0], [0.0, 1.0]]),
    [np.sqrt(5) / 2, np.sqrt(5) / 2],
    rtol=1e-5,
  )


@pytest.mark.torchjd
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchjd_aligned_mtl(seed):
  ta = pytest.importorskip("torchjd.aggregation")
  rng = np.random.default_rng(seed)
  j = random_jacobian(rng, 4, 25, correlated=True)
  for mode in ("min", "median", "rmse"):
    ref = torch_agg(ta.AlignedMTL(scale_mode=mode), j)
    np.testing.assert_allclose(apply(aligned_mtl(mode), j), ref, atol=1e-4 * np.abs(ref).max())
