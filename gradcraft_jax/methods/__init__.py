"""Every multi-task method of the library, one private module each.

Each method is a :class:`~gradcraft_jax.Weighting` (Gram matrix or losses ->
one weight per task) turned into an optax transform by
:func:`~gradcraft_jax.from_weighting`; its factory (``gradcraft(...)``,
``mgda()``, ...) returns that transform. GradCraft and NMT, the library's
two headline methods, follow the same rule as the methods they are compared
with (``_gradcraft.py``, ``_nmt.py``); the package namespace re-exports them
all.

Each module also exports the method's state NamedTuple (``<Method>State``)
and its weighting as a pure function, by one rule:

* ``<method>_weights(reads, *state_arrays, **hyperparameters) -> (T,)``: the
  first positional argument is what the weighting reads (the ``(T, T)`` Gram
  matrix for every method that reads it, the cross Gram matrix for the
  two-batch methods; the losses for loss-only methods; the task count for
  :func:`mean_weights`), then the method's state arrays, then keyword-only
  hyperparameters; the result is the ``(T,)`` weights ``w`` of the update
  ``sum_i w_i g_i``;
* ``<method>_step(...) -> (weights, new_state_arrays)``, same arguments,
  where one computation gives both the weights and the method's next state
  (DB-MTL, GradVac, SDMGrad, GradNorm, IMTL's and uncertainty weighting's
  log-scale steps).
"""

from gradcraft_jax.methods._aligned_mtl import (
  aligned_mtl,
  aligned_mtl_balance,
  aligned_mtl_weights,
)
from gradcraft_jax.methods._cagrad import cagrad, cagrad_weights
from gradcraft_jax.methods._common import pinv_psd
from gradcraft_jax.methods._conflict_free import conflict_free, conflict_free_weights
from gradcraft_jax.methods._constant import constant, constant_weights
from gradcraft_jax.methods._cosmos import cosmos, cosmos_weights
from gradcraft_jax.methods._cr_mogm import CRMOGMState, cr_mogm, cr_mogm_weights
from gradcraft_jax.methods._cross_batch import cross_gram
from gradcraft_jax.methods._dbmtl import DBMTLState, dbmtl, dbmtl_step
from gradcraft_jax.methods._dualproj import dualproj, dualproj_weights
from gradcraft_jax.methods._dwa import DWAState, dwa, dwa_weights
from gradcraft_jax.methods._excess_mtl import ExcessMTLState, excess_mtl, excess_mtl_weights
from gradcraft_jax.methods._fairgrad import fairgrad, fairgrad_weights
from gradcraft_jax.methods._famo import FAMOState, famo, famo_logit_gradient, famo_weights
from gradcraft_jax.methods._gls import gls, gls_weights
from gradcraft_jax.methods._gradcraft import (
  GradCraftState,
  gradcraft,
  gradcraft_coefficients,
  gradcraft_weights,
)
from gradcraft_jax.methods._graddrop import GradDropState, graddrop, graddrop_combine
from gradcraft_jax.methods._gradnorm import (
  GradNormState,
  gradnorm,
  gradnorm_step,
  gradnorm_weights,
)
from gradcraft_jax.methods._gradvac import GradVacState, gradvac, gradvac_step
from gradcraft_jax.methods._imtl import (
  IMTLState,
  imtl,
  imtl_g,
  imtl_g_weights,
  imtl_weights,
)
from gradcraft_jax.methods._imtl_l import IMTLLState, imtl_l, imtl_l_weights
from gradcraft_jax.methods._krum import krum, krum_weights
from gradcraft_jax.methods._mean import mean, mean_weights
from gradcraft_jax.methods._mgda import mgda, mgda_weights
from gradcraft_jax.methods._moco import MoCoState, moco
from gradcraft_jax.methods._modo import MoDoState, modo, modo_weights
from gradcraft_jax.methods._nash_mtl import nash_mtl, nash_mtl_weights
from gradcraft_jax.methods._nmt import (
  NMTState,
  nmt,
  nmt_loss,
  nmt_update_multipliers,
  nmt_weights,
)
from gradcraft_jax.methods._pbi import pbi, pbi_weights
from gradcraft_jax.methods._pcgrad import (
  PCGradState,
  pcgrad,
  pcgrad_plus,
  pcgrad_plus_weights,
  pcgrad_weights,
)
from gradcraft_jax.methods._rlw import RLWState, rlw, rlw_weights
from gradcraft_jax.methods._sdmgrad import SDMGradState, sdmgrad, sdmgrad_step
from gradcraft_jax.methods._stch import STCHState, stch, stch_weights
from gradcraft_jax.methods._trimmed_mean import trimmed_mean, trimmed_mean_combine
from gradcraft_jax.methods._uncertainty import (
  UncertaintyWeightingState,
  uncertainty_weighting,
  uncertainty_weights,
)
from gradcraft_jax.methods._upgrad import dual_cone_weights, upgrad, upgrad_weights

__all__ = [
  "pinv_psd",
  "DBMTLState",
  "DWAState",
  "GradCraftState",
  "GradVacState",
  "IMTLState",
  "NMTState",
  "PCGradState",
  "UncertaintyWeightingState",
  "aligned_mtl",
  "aligned_mtl_balance",
  "aligned_mtl_weights",
  "cagrad",
  "cagrad_weights",
  "dbmtl",
  "dbmtl_step",
  "dual_cone_weights",
  "dwa",
  "dwa_weights",
  "gradcraft",
  "gradcraft_coefficients",
  "gradcraft_weights",
  "gradvac",
  "gradvac_step",
  "imtl",
  "imtl_g",
  "imtl_g_weights",
  "imtl_weights",
  "mean",
  "mean_weights",
  "mgda",
  "mgda_weights",
  "nash_mtl",
  "nash_mtl_weights",
  "nmt",
  "nmt_loss",
  "nmt_update_multipliers",
  "nmt_weights",
  "pcgrad",
  "pcgrad_plus",
  "pcgrad_plus_weights",
  "pcgrad_weights",
  "uncertainty_weighting",
  "uncertainty_weights",
  "upgrad",
  "upgrad_weights",
  "CRMOGMState",
  "FAMOState",
  "GradNormState",
  "IMTLLState",
  "RLWState",
  "STCHState",
  "cr_mogm",
  "cr_mogm_weights",
  "famo",
  "famo_logit_gradient",
  "famo_weights",
  "gls",
  "gls_weights",
  "gradnorm",
  "gradnorm_step",
  "gradnorm_weights",
  "imtl_l",
  "imtl_l_weights",
  "rlw",
  "rlw_weights",
  "stch",
  "stch_weights",
  "constant",
  "constant_weights",
  "cosmos",
  "cosmos_weights",
  "pbi",
  "pbi_weights",
  "ExcessMTLState",
  "GradDropState",
  "MoCoState",
  "MoDoState",
  "SDMGradState",
  "conflict_free",
  "conflict_free_weights",
  "cross_gram",
  "dualproj",
  "dualproj_weights",
  "excess_mtl",
  "excess_mtl_weights",
  "fairgrad",
  "fairgrad_weights",
  "graddrop",
  "graddrop_combine",
  "krum",
  "krum_weights",
  "moco",
  "modo",
  "modo_weights",
  "sdmgrad",
  "sdmgrad_step",
  "trimmed_mean",
  "trimmed_mean_combine",
]
