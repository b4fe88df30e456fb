"""Equal weighting (mean): the plain mean of the task gradients, and torchjd's Mean."""

import numpy as np
import pytest
from method_helpers import (
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m


def test_mean_is_mean():
  g = np.random.default_rng(0).standard_normal((3, 10))
  (u,), _ = update_of(m.mean(), [g])
  np.testing.assert_allclose(u, g.mean(0), rtol=1e-12)


@pytest.mark.torchjd
def test_torchjd_mean():
  pytest.importorskip("torchjd")
  import torch
  from torchjd import aggregation as agg

  rng = np.random.default_rng(11)
  for t in [2, 3, 5]:
    g = rand_grads(rng, t, 10)
    j = torch.tensor(g)
    (u,), _ = update_of(m.mean(), [g])
    np.testing.assert_allclose(u, agg.Mean()(j).numpy(), rtol=1e-12)
