"""The registry of every method of the library, for the shared test suites.

One :class:`MethodCase` per method. The property suite
(``test_method_properties.py``), the compatibility matrix, the sharding
checks and the lean-path equivalence tests are parametrised over ``CASES``,
so a method added here is tested everywhere.

Non-conflict (``nonconflicting``), stated honestly:

* MGDA and UPGrad: yes (min-norm point of the convex hull; every UPGrad
  projection lies in the dual cone ``{x : <g_j, x> >= 0 for all j}``, a
  convex cone, so their mean does too, exactly for ``reg_eps=0``).
* Nash-MTL: ``<g_i, d> = 1/alpha_i > 0`` at an exact solution of
  ``K alpha = 1/alpha``, which only exists when no positive combination of
  the gradients vanishes; with dependent/opposite gradients the ridged
  solution may give a slightly negative product. Not claimed.
* CAGrad (any ``c``): maximises ``min_i <g_i, d>`` over a ball around the
  mean; that maximum is negative whenever the ball holds no improving
  direction. Not claimed.
* Aligned-MTL: ``<g_i, d> = sqrt(lambda_min)/T (V Lambda^(1/2) V^T 1)_i``
  can be negative. Not claimed.
* DB-MTL: a positive reweighting of the raw gradients. Not claimed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

import gradcraft_jax as gj
import gradcraft_jax.methods as m


class MethodCase(NamedTuple):
  """One method under test.

  Attributes:
    name: the method's name (test ids).
    make: ``make(num_tasks) -> transform``.
    needs_losses: whether ``update`` needs ``task_losses``.
    order_free: permuting the tasks (and losses) permutes nothing in the
      update (same update).
    nonconflicting: the update never has a negative inner product with a
      task gradient.
    extra: extra keyword arguments every update needs, as
      ``extra(num_tasks, rng) -> dict`` (e.g. MoDo's and SDMGrad's second
      batch, ``{"cross_gram": J1 @ J2.T}``), or ``None``. The suites pass
      them to every ``update`` and ``task_weights`` call.
    weighting: the update is ``sum_i w_i g_i`` with ``w`` from
      ``task_weights`` (so the lean step applies). ``False`` for methods
      that are their own transforms (trimmed mean, GradDrop, MoCo,
      ExcessMTL): ``task_weights`` raises ``TypeError`` for them.
  """

  name: str
  make: Callable[[int], Any]
  needs_losses: bool = False
  order_free: bool = True
  nonconflicting: bool = False
  extra: Callable[[int, Any], dict] | None = None
  weighting: bool = True


def cross_gram_extra(num_tasks, rng):
  """The second-batch argument of MoDo and SDMGrad for the shared suites:
  ``cross_gram = J_1 J_2^T`` of two random (T, 17) Jacobians (the methods
  also accept ``stacked_2=``, a second stacked tree; their own test files
  exercise that path)."""
  j1 = rng.standard_normal((num_tasks, 17))
  j2 = j1 + 0.3 * rng.standard_normal((num_tasks, 17))
  return {"cross_gram": np.asarray(j1 @ j2.T, np.float32)}


CASES = [
  MethodCase("mean", lambda t: m.mean(num_tasks=t)),
  MethodCase("uncertainty_weighting", lambda t: m.uncertainty_weighting(0.1, num_tasks=t), True),
  MethodCase("dwa", lambda t: m.dwa(2.0, num_tasks=t), True),
  MethodCase("mgda", lambda t: m.mgda(num_tasks=t), nonconflicting=True),
  MethodCase("pcgrad", lambda t: m.pcgrad(seed=1, num_tasks=t), order_free=False),
  MethodCase(
    "pcgrad_plus", lambda t: m.pcgrad_plus(0.5, 0.1, seed=1, num_tasks=t), order_free=False
  ),
  MethodCase("gradvac", lambda t: m.gradvac(0.5, num_tasks=t), order_free=False),
  MethodCase("imtl_g", lambda t: m.imtl_g(num_tasks=t)),
  MethodCase("imtl", lambda t: m.imtl(0.1, num_tasks=t), True),
  MethodCase("cagrad", lambda t: m.cagrad(0.4, num_tasks=t)),
  MethodCase("dbmtl", lambda t: m.dbmtl(0.9, 0.5, num_tasks=t), True),
  MethodCase("nash_mtl", lambda t: m.nash_mtl(num_tasks=t)),
  MethodCase("aligned_mtl", lambda t: m.aligned_mtl(num_tasks=t)),
  MethodCase("upgrad", lambda t: m.upgrad(num_tasks=t), nonconflicting=True),
  MethodCase("gradcraft", lambda t: gj.gradcraft(0.5, 0.1, num_tasks=t)),
  # New methods are appended below (one line each).
  # rlw: a random draw per task index (order-free only in distribution)
  MethodCase("rlw", lambda t: m.rlw(seed=1, num_tasks=t), order_free=False),
  MethodCase("gls", lambda t: m.gls(num_tasks=t), True),
  MethodCase("imtl_l", lambda t: m.imtl_l(0.1, num_tasks=t), True),
  MethodCase("famo", lambda t: m.famo(0.025, 1e-3, num_tasks=t), True),
  MethodCase("stch", lambda t: m.stch(1.0, num_tasks=t, warmup_steps=1, log_losses=True), True),
  MethodCase("gradnorm", lambda t: m.gradnorm(1.5, 0.01, num_tasks=t), True),
  MethodCase("cr_mogm", lambda t: m.cr_mogm(m.mgda(), 0.9, num_tasks=t)),
  # pbi: theta = 1 here; with the paper's theta = 5 the weights (up to 1 + theta) amplify
  # float32 rounding beyond the permutation test's tolerance (theta = 5: tests/test_pbi.py)
  MethodCase("pbi", lambda t: m.pbi(theta=1.0, num_tasks=t), True),
  MethodCase("cosmos", lambda t: m.cosmos(penalty=1.0, num_tasks=t), True),
  MethodCase("constant", lambda t: m.constant(num_tasks=t)),
  # Krum needs T >= n_byzantine + 3 (ValueError for T = 2, which the permutation test draws);
  # for T >= 3 it is order-free up to ties (tests/test_krum.py).
  MethodCase("krum", lambda t: m.krum(0, num_tasks=t), order_free=False),
  # trimmed mean drops one value at each end when T >= 3 (it needs T >= 2 * trim + 1)
  MethodCase(
    "trimmed_mean",
    lambda t: m.trimmed_mean(1 if isinstance(t, int) and t >= 3 else 0, num_tasks=t),
    weighting=False,
  ),
  MethodCase("graddrop", lambda t: m.graddrop(seed=1, num_tasks=t), weighting=False),
  MethodCase("fairgrad", lambda t: m.fairgrad(2.0, num_tasks=t)),
  MethodCase("conflict_free", lambda t: m.conflict_free(num_tasks=t)),
  MethodCase("dualproj", lambda t: m.dualproj(num_tasks=t), nonconflicting=True),
  MethodCase("modo", lambda t: m.modo(0.1, num_tasks=t), extra=cross_gram_extra),
  MethodCase("sdmgrad", lambda t: m.sdmgrad(0.3, num_tasks=t), extra=cross_gram_extra),
  MethodCase("moco", lambda t: m.moco(0.5, 0.1, num_tasks=t), weighting=False),
  MethodCase("excess_mtl", lambda t: m.excess_mtl(1.0, num_tasks=t), weighting=False),
]
IDS = [c.name for c in CASES]
