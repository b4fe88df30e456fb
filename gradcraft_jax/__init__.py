"""gradcraft-jax: multi-task gradient transformations for JAX and Optax.

Every method is three steps over *stacked* per-task gradients (a pytree like
the parameters whose leaves have a leading task axis ``T``):

1. :func:`gram_matrix`: the ``(T, T)`` Gram matrix of the task gradients
   (skipped by methods that only read the losses);
2. a :class:`Weighting`: Gram matrix, losses and state -> one weight per
   task (``gradcraft_jax.methods``: one private module per method);
3. :func:`weighted_sum`: one combined update.

:func:`from_weighting` turns a weighting into an optax transform; every
factory (``gradcraft(...)``, ``mgda()``, ``mean()``, ``nmt(...)``, ...)
returns one, to chain in front of any optax optimizer::

    losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
    tx = optax.chain(gradcraft_jax.gradcraft(tau=0.5, eps=0.1), optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params)

Public modules: :mod:`gradcraft_jax.weighting` (the core), and the
per-task, representation-level, diagnostics and stage-driver helpers
re-exported here; ``gradcraft_jax.methods`` holds every method (GradCraft
and NMT follow the same one-module-per-method rule as the others).
"""

# Step 1 and 3 of the core: Gram matrix and weighted sum of stacked gradients.
from gradcraft_jax._cpu_gram import KernelInfo, kernel_info
from gradcraft_jax._stacked import gram_matrix, num_tasks, weighted_sum
from gradcraft_jax.diagnostics import (
  GradientStats,
  conflict_counts,
  cosines_from_gram,
  gradient_cosines,
  gradient_stats,
)

# Per-task gradients and the training-step helpers built on the core.
from gradcraft_jax.lean import combined_value_and_grad, gram_coverage

# Every method, each a Weighting turned into an optax transform.
from gradcraft_jax.methods import (
  GradCraftState,
  NMTState,
  aligned_mtl,
  cagrad,
  config,
  constant,
  cosmos,
  cr_mogm,
  cross_gram,
  dbmtl,
  dualproj,
  dwa,
  excess_mtl,
  fairgrad,
  famo,
  gls,
  gradcraft,
  gradcraft_coefficients,
  gradcraft_weights,
  graddrop,
  gradnorm,
  gradvac,
  imtl,
  imtl_g,
  imtl_l,
  krum,
  mean,
  mgda,
  moco,
  modo,
  nash_mtl,
  nmt,
  nmt_loss,
  nmt_update_multipliers,
  nmt_weights,
  pbi,
  pcgrad,
  pcgrad_plus,
  rlw,
  sdmgrad,
  stch,
  trimmed_mean,
  uncertainty_weighting,
  upgrad,
)
from gradcraft_jax.methods._common import pinv_psd
from gradcraft_jax.per_task import per_task_value_and_grad
from gradcraft_jax.representation import representation_value_and_grad
from gradcraft_jax.stages import PrioritizedResult, StageHistory, train_prioritized

# Step 2 of the core: the weighting object and the transform built from it.
from gradcraft_jax.weighting import Weighting, WeightsQuery, from_weighting, task_weights

# Wrappers: shared-only crafting, skipping non-finite steps, accumulation.
from gradcraft_jax.wrappers import (
  ApplyIfFiniteState,
  MultiSteps,
  MultiStepsState,
  SharedOnlyState,
  apply_if_finite,
  label_by_path,
  shared_only,
  task_sum,
)

__version__ = "0.1.0"

__all__ = [
  # the core: Gram matrix -> weighting -> weighted sum
  "Weighting",
  "WeightsQuery",
  "from_weighting",
  "gram_matrix",
  "num_tasks",
  "pinv_psd",
  "task_weights",
  "weighted_sum",
  "KernelInfo",
  "kernel_info",
  # wrappers
  "ApplyIfFiniteState",
  "MultiSteps",
  "MultiStepsState",
  "SharedOnlyState",
  "apply_if_finite",
  "label_by_path",
  "shared_only",
  "task_sum",
  # gradients and diagnostics
  "combined_value_and_grad",
  "gram_coverage",
  "per_task_value_and_grad",
  "representation_value_and_grad",
  "GradientStats",
  "conflict_counts",
  "cosines_from_gram",
  "gradient_cosines",
  "gradient_stats",
  # GradCraft
  "GradCraftState",
  "gradcraft",
  "gradcraft_coefficients",
  "gradcraft_weights",
  # NMT
  "NMTState",
  "nmt",
  "nmt_loss",
  "nmt_update_multipliers",
  "nmt_weights",
  "PrioritizedResult",
  "StageHistory",
  "train_prioritized",
  # comparison methods
  "aligned_mtl",
  "cagrad",
  "dbmtl",
  "dwa",
  "gradvac",
  "imtl",
  "imtl_g",
  "mean",
  "mgda",
  "nash_mtl",
  "pcgrad",
  "pcgrad_plus",
  "uncertainty_weighting",
  "upgrad",
  # issue 14: loss-only weightings, GradNorm, CR-MOGM
  "cr_mogm",
  "famo",
  "gls",
  "gradnorm",
  "imtl_l",
  "rlw",
  "stch",
  "constant",
  "cosmos",
  "pbi",
  # issue 14: Gram-based, elementwise, cross-batch, full-gradient state
  "config",
  "cross_gram",
  "dualproj",
  "excess_mtl",
  "fairgrad",
  "graddrop",
  "krum",
  "moco",
  "modo",
  "sdmgrad",
  "trimmed_mean",
]
