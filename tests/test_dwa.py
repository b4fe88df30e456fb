"""Dynamic weight average (Liu et al., CVPR 2019) against a NumPy loop over
steps written from the paper."""

import numpy as np
from method_helpers import (
  rand_grads,
  update_of,
)

import gradcraft_jax.methods as m


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
