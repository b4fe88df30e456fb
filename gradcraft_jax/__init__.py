"""gradcraft-jax: multi-task gradient transformations for JAX and Optax.

Every method is three steps over *stacked* per-task gradients (a pytree like
the parameters whose leaves have a leading task axis ``T``):

1. :func:`gram_matrix`: the ``(T, T)`` Gram matrix of the task gradients
   (skipped by methods that only read the losses);
2. a :class:`Weighting`: Gram matrix, losses and state -> one weight per
   task;
3. :func:`weighted_sum`: one combined update.

Every factory (``gradcraft(...)``, ``mgda()``, ``mean()``, ``nmt(...)``, ...)
returns a :class:`Method`, an optax transform that carries its weighting, to
chain in front of any optax optimizer::

    losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
    tx = optax.chain(gradcraft_jax.gradcraft(tau=0.5, eps=0.1), optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params)

or to pass to the lean training step :func:`combined_value_and_grad`, which
forms the combined gradient without the stacked gradients.

The top level holds the common path: the core, the gradient producers, the
optax wrappers and every method factory. The rest lives in named modules:
:mod:`gradcraft_jax.methods` (each method's state NamedTuple and pure
``*_weights`` / ``*_step`` functions), :mod:`gradcraft_jax.diagnostics`
(gradient cosines and conflict counts), :mod:`gradcraft_jax.stages` (NMT's
stage driver), :mod:`gradcraft_jax.wrappers` (the wrappers' states) and
:mod:`gradcraft_jax.datasets` (the bundled Census-Income data, imported on
first use).
"""

from gradcraft_jax import diagnostics, methods, stages, wrappers

# Steps 1 and 3 of the core: Gram matrix and weighted sum of stacked gradients.
from gradcraft_jax._cpu_gram import KernelInfo, kernel_info
from gradcraft_jax._stacked import cross_gram, gram_matrix, weighted_sum

# Gradient producers: stacked per-task gradients, the lean step, representations.
from gradcraft_jax.lean import Coverage, FallbackWarning, combined_value_and_grad, gram_coverage

# Every method factory.
from gradcraft_jax.methods import (
  aligned_mtl,
  cagrad,
  conflict_free,
  constant,
  cosmos,
  cr_mogm,
  dbmtl,
  dualproj,
  dwa,
  excess_mtl,
  fairgrad,
  famo,
  gls,
  gradcraft,
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
from gradcraft_jax.per_task import per_task_value_and_grad
from gradcraft_jax.representation import representation_value_and_grad

# Step 2 of the core: the weighting object and the transform built from it.
from gradcraft_jax.weighting import (
  CoordinatewiseMethod,
  Method,
  Weighting,
  from_weighting,
  inject_hyperparams,
  task_weights,
  weighting_of,
)

# Wrappers: shared-only crafting, skipping non-finite steps, accumulation.
from gradcraft_jax.wrappers import (
  MultiSteps,
  apply_if_finite,
  label_by_path,
  shared_only,
  task_sum,
)

__version__ = "1.0.0"

__all__ = [
  # the core: Gram matrix -> weighting -> weighted sum
  "CoordinatewiseMethod",
  "Method",
  "Weighting",
  "cross_gram",
  "from_weighting",
  "gram_matrix",
  "inject_hyperparams",
  "task_weights",
  "weighted_sum",
  "weighting_of",
  # the optional compiled CPU kernel
  "KernelInfo",
  "kernel_info",
  # gradients
  "Coverage",
  "FallbackWarning",
  "combined_value_and_grad",
  "gram_coverage",
  "per_task_value_and_grad",
  "representation_value_and_grad",
  # wrappers
  "MultiSteps",
  "apply_if_finite",
  "label_by_path",
  "shared_only",
  "task_sum",
  # the two headline methods
  "gradcraft",
  "nmt",
  # the methods they are compared with
  "aligned_mtl",
  "cagrad",
  "conflict_free",
  "constant",
  "cosmos",
  "cr_mogm",
  "dbmtl",
  "dualproj",
  "dwa",
  "excess_mtl",
  "fairgrad",
  "famo",
  "gls",
  "graddrop",
  "gradnorm",
  "gradvac",
  "imtl",
  "imtl_g",
  "imtl_l",
  "krum",
  "mean",
  "mgda",
  "moco",
  "modo",
  "nash_mtl",
  "pbi",
  "pcgrad",
  "pcgrad_plus",
  "rlw",
  "sdmgrad",
  "stch",
  "trimmed_mean",
  "uncertainty_weighting",
  "upgrad",
  # modules
  "diagnostics",
  "methods",
  "stages",
  "wrappers",
]


def __getattr__(name):
  # ``gradcraft_jax.datasets`` (the bundled Census data) is imported on first
  # use only: the training path never needs it.
  if name == "datasets":
    import importlib

    return importlib.import_module("gradcraft_jax.datasets")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
