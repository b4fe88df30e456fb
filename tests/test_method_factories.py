"""Concerns shared by the comparison methods' factories: positive
homogeneity in float32 over 20 orders of magnitude, hyperparameter
validation, and the top-level re-exports."""

import jax.numpy as jnp
import numpy as np
import pytest
from method_helpers import (
  update_of,
)

import gradcraft_jax as gj
import gradcraft_jax.methods as m


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
    lambda: m.mgda(num_iters=0),
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
  for name in ("cagrad", "dbmtl", "nash_mtl", "aligned_mtl", "upgrad"):
    assert getattr(gj, name) is not None
