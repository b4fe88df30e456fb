"""Uniform validation of every factory argument: a bad value fails at
construction with a ValueError naming the argument.

``num_tasks`` is checked for every method of the registry (new methods are
picked up from ``method_cases.CASES``); the other arguments are listed per
method below.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_cases import CASES, IDS

import gradcraft_jax as gj
import gradcraft_jax.methods as m

BAD_NUM_TASKS = [True, False, 2.5, 2.0, 0, -1, "2", np.float32(2.0), jnp.array([2])]


@pytest.mark.parametrize("bad", BAD_NUM_TASKS, ids=repr)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_num_tasks_must_be_a_positive_int(case, bad):
  with pytest.raises(ValueError, match="num_tasks"):
    case.make(bad)


@pytest.mark.parametrize("good", [2, np.int64(2), jnp.array(2)], ids=repr)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_num_tasks_accepts_ints(case, good):
  tx = case.make(good)
  tx.init({"w": jnp.zeros(3)})


def test_gradcraft_num_tasks_rejects_float_and_bool():
  with pytest.raises(ValueError, match="num_tasks"):
    gj.gradcraft(norm_decay=0.9, num_tasks=2.5)
  with pytest.raises(ValueError, match="num_tasks"):
    gj.gradcraft(num_tasks=True)


# (factory, keyword arguments, argument named in the error)
BAD_ARGS = [
  # GradCraft: tau in [0, 1], eps >= 0, norm_decay in [0, 1)
  (gj.gradcraft, {"tau": -0.1}, "tau"),
  (gj.gradcraft, {"tau": 1.5}, "tau"),
  (gj.gradcraft, {"tau": float("nan")}, "tau"),
  (gj.gradcraft, {"tau": True}, "tau"),
  (gj.gradcraft, {"tau": "0.5"}, "tau"),
  (gj.gradcraft, {"eps": -1e-3}, "eps"),
  (gj.gradcraft, {"eps": float("inf")}, "eps"),
  (gj.gradcraft, {"norm_decay": 1.0, "num_tasks": 2}, "norm_decay"),
  (gj.gradcraft, {"norm_decay": -0.5, "num_tasks": 2}, "norm_decay"),
  (gj.gradcraft, {"norm_decay": 0.9}, "num_tasks"),
  # mean
  (m.mean, {"num_tasks": 0}, "num_tasks"),
  # MGDA: num_iters a positive int
  (m.mgda, {"num_iters": 0}, "num_iters"),
  (m.mgda, {"num_iters": 2.5}, "num_iters"),
  (m.mgda, {"num_iters": True}, "num_iters"),
  # PCGrad / PCGrad+: int seed; tau in [0, 1], eps >= 0
  (m.pcgrad, {"seed": 1.5}, "seed"),
  (m.pcgrad, {"seed": True}, "seed"),
  (m.pcgrad_plus, {"seed": "0"}, "seed"),
  (m.pcgrad_plus, {"tau": 2.0}, "tau"),
  (m.pcgrad_plus, {"eps": -1.0}, "eps"),
  # GradVac: beta in [0, 1], int seed, num_tasks required
  (m.gradvac, {"beta": 1.5, "num_tasks": 2}, "beta"),
  (m.gradvac, {"beta": -0.1, "num_tasks": 2}, "beta"),
  (m.gradvac, {"seed": 0.5, "num_tasks": 2}, "seed"),
  (m.gradvac, {"num_tasks": None}, "num_tasks"),
  # IMTL: lr >= 0, num_tasks required
  (m.imtl, {"lr": -1.0, "num_tasks": 2}, "lr"),
  (m.imtl, {"num_tasks": None}, "num_tasks"),
  (m.imtl_g, {"num_tasks": 1.0}, "num_tasks"),
  # CAGrad: c >= 0, norm_eps >= 0, positive int iteration counts, bool rescale
  (m.cagrad, {"c": -0.1}, "c"),
  (m.cagrad, {"norm_eps": -1.0}, "norm_eps"),
  (m.cagrad, {"outer_iters": 0}, "outer_iters"),
  (m.cagrad, {"inner_iters": 2.0}, "inner_iters"),
  (m.cagrad, {"outer_iters": True}, "outer_iters"),
  (m.cagrad, {"rescale": 1}, "rescale"),
  # DB-MTL: beta in [0, 1), beta_sigma >= 0, eps >= 0, num_tasks required
  (m.dbmtl, {"beta": 1.0, "num_tasks": 2}, "beta"),
  (m.dbmtl, {"beta_sigma": -1.0, "num_tasks": 2}, "beta_sigma"),
  (m.dbmtl, {"eps": -1.0, "num_tasks": 2}, "eps"),
  (m.dbmtl, {"num_tasks": None}, "num_tasks"),
  # DWA: temperature > 0, num_tasks required
  (m.dwa, {"temperature": 0.0, "num_tasks": 2}, "temperature"),
  (m.dwa, {"num_tasks": None}, "num_tasks"),
  # uncertainty weighting: lr >= 0, num_tasks required
  (m.uncertainty_weighting, {"lr": -1.0, "num_tasks": 2}, "lr"),
  (m.uncertainty_weighting, {"num_tasks": None}, "num_tasks"),
  # Nash-MTL: positive int num_iters, ridge >= 0, max_norm >= 0
  (m.nash_mtl, {"num_iters": 0}, "num_iters"),
  (m.nash_mtl, {"num_iters": 3.0}, "num_iters"),
  (m.nash_mtl, {"ridge": -1.0}, "ridge"),
  (m.nash_mtl, {"max_norm": -1.0}, "max_norm"),
  # Aligned-MTL: scale_mode one of the documented modes
  (m.aligned_mtl, {"scale_mode": "max"}, "scale_mode"),
  # UPGrad: positive int num_iters, reg_eps >= 0
  (m.upgrad, {"num_iters": 0}, "num_iters"),
  (m.upgrad, {"num_iters": False}, "num_iters"),
  (m.upgrad, {"reg_eps": -1.0}, "reg_eps"),
  # NMT: finite 1-D targets, lagrange_lr >= 0, lagrange_clip >= 0,
  # init_multiplier in [0, clip]
  (gj.nmt, {"targets": [], "lagrange_lr": 0.1, "lagrange_clip": 1.0}, "targets"),
  (gj.nmt, {"targets": [float("nan")], "lagrange_lr": 0.1, "lagrange_clip": 1.0}, "targets"),
  (gj.nmt, {"targets": [0.5], "lagrange_lr": -0.1, "lagrange_clip": 1.0}, "lagrange_lr"),
  (gj.nmt, {"targets": [0.5], "lagrange_lr": 0.1, "lagrange_clip": -1.0}, "lagrange_clip"),
  (
    gj.nmt,
    {"targets": [0.5], "lagrange_lr": 0.1, "lagrange_clip": 1.0, "init_multiplier": 2.0},
    "init_multiplier",
  ),
  (gj.nmt, {"targets": [0.5], "lagrange_lr": True, "lagrange_clip": 1.0}, "lagrange_lr"),
]


@pytest.mark.parametrize(
  "factory, kwargs, arg",
  BAD_ARGS,
  ids=[f"{f.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}" for f, kw, _ in BAD_ARGS],
)
def test_bad_argument_raises_naming_it(factory, kwargs, arg):
  with pytest.raises(ValueError, match=arg):
    factory(**kwargs)


# (factory, keyword arguments): valid edge values are accepted
GOOD_ARGS = [
  (gj.gradcraft, {"tau": 0.0, "eps": 0.0}),
  (gj.gradcraft, {"tau": 1, "norm_decay": 0.0}),
  (gj.gradcraft, {"norm_decay": 0.99, "num_tasks": 2}),
  (m.mgda, {"num_iters": 1}),
  (m.pcgrad, {"seed": np.int32(3)}),
  (m.cagrad, {"c": 0.0, "rescale": True, "outer_iters": 1, "inner_iters": 1}),
  (m.dbmtl, {"beta": 0.0, "num_tasks": 2}),
  (m.nash_mtl, {"num_iters": 1, "ridge": 0.0}),
  (m.upgrad, {"num_iters": 1, "reg_eps": 0.0}),
  (gj.nmt, {"targets": [0.5], "lagrange_lr": 0.0, "lagrange_clip": 0.0}),
]


@pytest.mark.parametrize("factory, kwargs", GOOD_ARGS)
def test_valid_edge_values_are_accepted(factory, kwargs):
  factory(**kwargs)


def test_injected_hyperparameters_are_not_checked_at_construction():
  # arrays (optax.inject_hyperparams) are checked where they are concrete only
  tx = optax.inject_hyperparams(gj.gradcraft)(tau=0.3, eps=0.1)
  tx.init({"w": jnp.zeros(2)})


@pytest.mark.parametrize(
  "call, arg",
  [
    (lambda: gj.apply_if_finite(optax.sgd(1.0), -1), "max_consecutive_errors"),
    (lambda: gj.apply_if_finite(optax.sgd(1.0), 1.5), "max_consecutive_errors"),
    (lambda: gj.apply_if_finite(optax.sgd(1.0), True), "max_consecutive_errors"),
    (lambda: gj.MultiSteps(optax.sgd(1.0), 2), "num_tasks"),
    (lambda: gj.MultiSteps(optax.sgd(1.0), 2, num_tasks=2.0), "num_tasks"),
    (lambda: gj.MultiSteps(optax.sgd(1.0), 0, num_tasks=2), "every_k_schedule"),
    (lambda: gj.MultiSteps(optax.sgd(1.0), 2.5, num_tasks=2), "every_k_schedule"),
  ],
)
def test_wrapper_arguments(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()


@pytest.mark.parametrize("factory", [m.pcgrad, m.pcgrad_plus])
def test_injected_seed_is_accepted(factory):
  tx = optax.inject_hyperparams(factory)(seed=3)
  state = tx.init({"w": jnp.zeros(2)})
  tx.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, state)
