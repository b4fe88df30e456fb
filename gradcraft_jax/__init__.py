"""gradcraft-jax: multi-task gradient transformations for JAX and Optax.

Every transform takes *stacked* per-task gradients (a pytree like the
parameters whose leaves have a leading task axis ``T``) and returns one
combined update, so it can be chained in front of any optax optimizer::

    losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
    tx = optax.chain(gradcraft_jax.gradcraft(tau=0.5, eps=0.1), optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params)
"""

from gradcraft_jax import datasets
# The shared core: Gram matrix -> task weights -> weighted sum.
from gradcraft_jax._stacked import gram_matrix, num_tasks, weighted_sum
from gradcraft_jax.weighting import from_weighting, pinv_psd, task_weights
# Per-task gradients, representation-level gradients, diagnostics.
from gradcraft_jax.per_task import per_task_value_and_grad
from gradcraft_jax.representation import representation_value_and_grad
from gradcraft_jax.diagnostics import (GradientStats, conflict_counts,
                                       cosines_from_gram, gradient_cosines,
                                       gradient_stats)
# GradCraft and NMT.
from gradcraft_jax.gradcraft import (GradCraftState, gradcraft,
                                     gradcraft_coefficients,
                                     gradcraft_weights)
from gradcraft_jax.nmt import (NMTState, nmt, nmt_loss,
                               nmt_update_multipliers, nmt_weights)
from gradcraft_jax.stages import (PrioritizedResult, StageHistory,
                                  train_prioritized)
# The methods they are compared with.
from gradcraft_jax.methods import (aligned_mtl, cagrad, dbmtl, dwa, gradvac,
                                   imtl, imtl_g, mean, mgda, nash_mtl, pcgrad,
                                   pcgrad_plus, uncertainty_weighting, upgrad)

__version__ = "0.1.0"

__all__ = [
    # core
    "from_weighting", "gram_matrix", "num_tasks", "pinv_psd", "task_weights",
    "weighted_sum",
    # gradients and diagnostics
    "per_task_value_and_grad", "representation_value_and_grad",
    "GradientStats", "conflict_counts", "cosines_from_gram",
    "gradient_cosines", "gradient_stats",
    # GradCraft
    "GradCraftState", "gradcraft", "gradcraft_coefficients",
    "gradcraft_weights",
    # NMT
    "NMTState", "nmt", "nmt_loss", "nmt_update_multipliers", "nmt_weights",
    "PrioritizedResult", "StageHistory", "train_prioritized",
    # comparison methods
    "aligned_mtl", "cagrad", "dbmtl", "dwa", "gradvac", "imtl", "imtl_g",
    "mean", "mgda", "nash_mtl", "pcgrad", "pcgrad_plus",
    "uncertainty_weighting", "upgrad",
]
