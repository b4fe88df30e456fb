"""Edge cases of FairGrad, ConFIG, DualProj, Krum (Gram methods), trimmed
mean, GradDrop (elementwise), MoDo, SDMGrad (cross-batch), MoCo and ExcessMTL
(full state) beyond the shared suite: scales 1e-12 to 1e12, zero, duplicate
and opposite tasks with one compiled update per method, and T = 1."""

import jax
import numpy as np
import pytest
from gram_method_helpers import params_of, stacked

from gradcraft_jax import methods as m

MAKE = {
  "fairgrad": lambda t: m.fairgrad(2.0, num_tasks=t),
  "conflict_free": lambda t: m.conflict_free(num_tasks=t),
  "dualproj": lambda t: m.dualproj(num_tasks=t),
  "krum": lambda t: m.krum(0, num_tasks=t),
  "trimmed_mean": lambda t: m.trimmed_mean(1 if t >= 3 else 0, num_tasks=t),
  "graddrop": lambda t: m.graddrop(num_tasks=t),
  "modo": lambda t: m.modo(0.1, num_tasks=t),
  "sdmgrad": lambda t: m.sdmgrad(0.3, num_tasks=t),
  "moco": lambda t: m.moco(num_tasks=t),
  "excess_mtl": lambda t: m.excess_mtl(num_tasks=t),
}
CROSS = {"modo", "sdmgrad"}


def inputs(rng, t, d=12):
  base = rng.standard_normal((t, d))
  dup = base.copy()
  dup[1] = dup[0]
  opp = base.copy()
  opp[1] = -opp[0]
  zero_one = base.copy()
  zero_one[0] = 0.0
  return {"normal": base, "duplicate": dup, "opposite": opp, "one_zero": zero_one}


@pytest.mark.parametrize("name", sorted(MAKE))
def test_finite_over_scales_and_degenerate_tasks(name):
  rng = np.random.default_rng(0)
  t = 3
  tx = MAKE[name](t)
  update = jax.jit(tx.update)
  for kind, j in inputs(rng, t).items():
    for scale in (1e-12, 1e-6, 1.0, 1e6, 1e12):
      js = scale * j
      kw = (
        {"stacked_2": stacked(js + 0.1 * scale * rng.standard_normal(js.shape))}
        if name in CROSS
        else {}
      )
      state = tx.init(params_of(js))
      for _ in range(2):
        upd, state = update(stacked(js), state, **kw)
      for leaf in jax.tree_util.tree_leaves((upd, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (kind, scale, leaf)
  zeros = np.zeros((t, 12))
  kw = {"stacked_2": stacked(zeros)} if name in CROSS else {}
  upd, _ = update(stacked(zeros), tx.init(params_of(zeros)), **kw)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(upd))


@pytest.mark.parametrize("name", sorted(MAKE))
def test_single_task(name):
  j = np.random.default_rng(1).standard_normal((1, 12))
  tx = MAKE[name](1)
  kw = {"stacked_2": stacked(j)} if name in CROSS else {}
  if name == "krum":  # needs T >= n_byzantine + 3
    with pytest.raises(ValueError, match="n_byzantine"):
      tx.update(stacked(j), tx.init(params_of(j)))
    return
  upd, _ = jax.jit(tx.update)(stacked(j), tx.init(params_of(j)), **kw)
  out = np.concatenate([np.asarray(x).ravel() for x in (upd["a"], upd["b"])])
  # one task: every method moves along g (FairGrad: w = ||g||^(-2/(1+1/alpha)))
  g = j[0]
  cos = out @ g / (np.linalg.norm(out) * np.linalg.norm(g))
  assert cos > 1 - 1e-5, cos
