"""Multi-task gradient methods GradCraft is compared with.

Every method is a factory returning an optax transformation over stacked
per-task gradients, with the same contract as :func:`gradcraft_jax.gradcraft`.
"""

# Part A.
from gradcraft_jax.methods.dwa import DWAState, dwa, dwa_weights
from gradcraft_jax.methods.gradvac import GradVacState, gradvac, gradvac_weights
from gradcraft_jax.methods.imtl import (IMTLState, imtl, imtl_g,
                                        imtl_g_weights, imtl_weights)
from gradcraft_jax.methods.mean import mean, mean_weights
from gradcraft_jax.methods.mgda import mgda, mgda_weights
from gradcraft_jax.methods.pcgrad import (PCGradState, pcgrad, pcgrad_plus,
                                          pcgrad_plus_weights, pcgrad_weights)
from gradcraft_jax.methods.uncertainty import (UncertaintyWeightingState,
                                               uncertainty_weighting,
                                               uncertainty_weights)
# Part B.
from gradcraft_jax.methods.aligned_mtl import (aligned_mtl,
                                               aligned_mtl_balance,
                                               aligned_mtl_weights)
from gradcraft_jax.methods.cagrad import cagrad, cagrad_weights
from gradcraft_jax.methods.dbmtl import DBMTLState, dbmtl, dbmtl_weights
from gradcraft_jax.methods.nash_mtl import nash_mtl, nash_mtl_weights
from gradcraft_jax.methods.upgrad import (dual_cone_weights, upgrad,
                                          upgrad_weights)

__all__ = [
    # Part A.
    "DWAState", "GradVacState", "IMTLState", "PCGradState",
    "UncertaintyWeightingState", "dwa", "dwa_weights", "gradvac",
    "gradvac_weights", "imtl", "imtl_g", "imtl_g_weights", "imtl_weights",
    "mean", "mean_weights", "mgda", "mgda_weights", "pcgrad", "pcgrad_plus",
    "pcgrad_plus_weights", "pcgrad_weights", "uncertainty_weighting",
    "uncertainty_weights",
    # Part B.
    "DBMTLState", "aligned_mtl", "aligned_mtl_balance", "aligned_mtl_weights",
    "cagrad", "cagrad_weights", "dbmtl", "dbmtl_weights", "dual_cone_weights",
    "nash_mtl", "nash_mtl_weights", "upgrad", "upgrad_weights",
]
