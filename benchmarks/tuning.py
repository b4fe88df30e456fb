"""The equal tuning budget of the benchmarks: one learning-rate grid for
every entry, and up to ``trials`` settings of each method's main
hyperparameters.

Every entry (equal weighting, the single-task models and NMT included) is
trained at every learning rate of the grid; a method with hyperparameters of
its own is also trained at each of its first ``trials`` settings listed in
:data:`HPARAMS` (the paper's recommended value or the library's default
first, then values around it). A method without hyperparameters gets the
learning-rate grid only. The setting with the best validation score is
selected; nothing else is tuned (the inner solver iterations, which are not
hyperparameters of the method's objective, keep the library's defaults).

This is a plain module used by the benchmarks (``sys.path`` must include
``benchmarks/``); it is not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

import itertools

# method -> (hyperparameter settings, source). Each setting is a dict of
# factory keyword arguments; an empty list: no hyperparameter is tuned.
HPARAMS: dict[str, tuple[list[dict], str]] = {
  "mean": ([], "none"),
  "constant": ([], "none (weights 1: the sum; with Adam, equal weighting up to Adam's epsilon)"),
  "uncertainty_weighting": (
    [{"lr": 1e-2}, {"lr": 1e-1}, {"lr": 1e-3}],
    "step size of the log-variances (library default first)",
  ),
  "dwa": (
    [{"temperature": 2.0}, {"temperature": 1.0}, {"temperature": 5.0}],
    "temperature; the paper uses 2",
  ),
  "rlw": ([], "none"),
  "gls": ([], "none"),
  "famo": (
    [{"weight_decay": 1e-3}, {"weight_decay": 1e-2}, {"weight_decay": 1e-4}],
    "weight decay gamma of the logits; the paper's 1e-3 first",
  ),
  "stch": ([{"mu": 1.0}, {"mu": 0.1}, {"mu": 0.01}], "smoothing mu; the paper evaluates 0.01 to 1"),
  "imtl_l": (
    [{"lr": 1e-2}, {"lr": 1e-1}, {"lr": 1e-3}],
    "step size of the loss scales (library default first)",
  ),
  "gradnorm": (
    [{"alpha": 1.5}, {"alpha": 0.5}, {"alpha": 0.12}],
    "asymmetry alpha; the paper's 1.5 (NYUv2) first, 0.12 its value on regression",
  ),
  "mgda": ([], "none"),
  "pcgrad": ([], "none"),
  "pcgrad_plus": (
    [{"tau": 0.5, "eps": 0.0}, {"tau": 0.1, "eps": 0.0}, {"tau": 0.6, "eps": 0.1}],
    "GradCraft's tau and eps (its ablation)",
  ),
  "gradvac": (
    [{"beta": 0.01}, {"beta": 0.1}, {"beta": 0.5}],
    "EMA rate beta; the paper's 0.01 first, the library default 0.5",
  ),
  "cagrad": ([{"c": 0.4}, {"c": 0.2}, {"c": 0.8}], "ball radius c; the paper's 0.4 first"),
  "imtl_g": ([], "none"),
  "imtl": (
    [{"lr": 1e-2}, {"lr": 1e-1}, {"lr": 1e-3}],
    "step size of the loss scales (library default first)",
  ),
  "dbmtl": (
    [{"beta": 0.9}, {"beta": 0.5}, {"beta": 0.99}],
    "norm EMA beta; LibMTL's 0.9 first",
  ),
  "nash_mtl": ([], "none"),
  "aligned_mtl": ([], "none"),
  "upgrad": ([], "none"),
  "cr_mogm": (
    [{"alpha": 0.9}, {"alpha": 0.5}, {"alpha": 0.99}],
    "EMA coefficient alpha of the weights (library default first), on MGDA",
  ),
  "fairgrad": (
    [{"alpha": 1.0}, {"alpha": 2.0}, {"alpha": 0.5}],
    "fairness alpha; 1 (proportional fairness) first",
  ),
  "conflict_free": ([], "none"),
  "cosmos": (
    [{"penalty": 1.0}, {"penalty": 0.1}, {"penalty": 8.0}],
    "cosine penalty; the paper uses 0.01 to 8",
  ),
  "dualproj": ([], "none"),
  "excess_mtl": (
    [{"robust_step_size": 1.0}, {"robust_step_size": 0.1}, {"robust_step_size": 0.01}],
    "robust step size (library default first)",
  ),
  "graddrop": ([], "none"),
  "krum": ([], "none (f = 0, one selected gradient)"),
  "moco": (
    [{"gamma": 0.1}, {"gamma": 0.01}, {"gamma": 1.0}],
    "weight step size gamma (library default first)",
  ),
  "modo": (
    [{"gamma": 0.1}, {"gamma": 0.01}, {"gamma": 1.0}],
    "weight step size gamma (library default first)",
  ),
  "pbi": ([{"theta": 5.0}, {"theta": 1.0}, {"theta": 10.0}], "penalty theta; the paper's 5 first"),
  "sdmgrad": (
    [{"lambda_": 0.3}, {"lambda_": 0.1}, {"lambda_": 0.6}],
    "pull lambda towards the preference (library default first)",
  ),
  "trimmed_mean": ([], "none (T = 3 allows trim_number = 1 only)"),
  "gradcraft": (
    [{"tau": 0.5, "eps": 0.0}, {"tau": 0.1, "eps": 0.0}, {"tau": 0.6, "eps": 0.1}],
    "tau and eps (library default first; tau = 0.1 with eps ~ 0 as in the official code)",
  ),
  # GradCraft's parts (census_benchmark.py --ablation): the same values as
  # GradCraft's own first settings.
  "gradcraft_magnitude": ([{"tau": 0.5}, {"tau": 0.1}, {"tau": 0.6}], "GradCraft's tau"),
  "gradcraft_direction": ([{"eps": 0.0}, {"eps": 0.1}, {"eps": 0.01}], "GradCraft's eps"),
  "single_task": ([], "none"),
  "nmt": ([], "none (targets from the priority stages)"),
}


def settings(method: str, trials: int) -> list[dict]:
  """The hyperparameter settings tried for ``method`` (``[{}]`` if none)."""
  if trials < 1:
    raise ValueError(f"trials must be >= 1, got {trials}")
  hp = HPARAMS.get(method, ([], "not listed: library defaults"))[0]
  return [dict(h) for h in hp[:trials]] or [{}]


def grid(method: str, lrs, trials: int) -> list[tuple[float, dict]]:
  """``(learning rate, hyperparameters)`` of every trial of ``method``."""
  return [(float(lr), h) for lr, h in itertools.product(lrs, settings(method, trials))]


def tuned_names(method: str, trials: int) -> list[str]:
  """The hyperparameter names that vary over the settings tried (sorted)."""
  return sorted({k for h in settings(method, trials) for k in h})


def describe(hp: dict) -> str:
  """``tau=0.5, eps=0`` (``-`` for no hyperparameters)."""
  return (
    ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()) or "-"
  )
