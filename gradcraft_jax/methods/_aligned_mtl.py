r"""Aligned-MTL: independent component alignment.

Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023 (arXiv:2305.19000).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_num_tasks, empty_init, normalize_gram
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["aligned_mtl", "aligned_mtl_weights", "aligned_mtl_balance"]

_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_balance(gram: jax.Array, scale_mode: str = "min") -> jax.Array:
  r"""The balance matrix ``B`` with ``B J`` the aligned gradients.

  With :math:`K = V \operatorname{diag}(\lambda) V^\top` (eigenvalues above
  ``max(lambda) * T * eps`` kept, the rest treated as zero, as in torchjd),

  .. math:: B = \sqrt{\lambda_\star}\, V_r \operatorname{diag}(\lambda_r)^{-1/2}
     V_r^\top,

  where :math:`\lambda_\star` is the smallest kept eigenvalue (``"min"``,
  the paper), their lower median (``"median"``) or their mean (``"rmse"``,
  the original code). With :math:`J = U \Sigma W^\top` (SVD, ``U = V``),
  :math:`B J = \sqrt{\lambda_\star}\, U_r W_r^\top`: the aligned gradients
  (rows) have Gram matrix :math:`\lambda_\star V_r V_r^\top`, i.e. they are
  orthogonal with equal norms :math:`\sqrt{\lambda_\star}` when ``K`` has
  full rank. If every eigenvalue is zero, ``B = I``.

  Args:
    gram: ``(T, T)`` Gram matrix.
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

  Returns:
    ``(T, T)`` matrix ``B`` (in the scale of ``gram``).

  Examples:
    >>> import jax.numpy as jnp
    >>> # orthogonal gradients of norms 3 and 1: B = diag(1/3, 1) rescales
    >>> # both to the smallest singular value, 1
    >>> k = jnp.diag(jnp.array([9., 1.]))
    >>> b = aligned_mtl_balance(k)
    >>> [round(float(x), 4) for x in jnp.diagonal(b)]
    [0.3333, 1.0]
    >>> [round(float(x), 4) for x in jnp.diagonal(b @ k @ b)]  # aligned norms^2
    [1.0, 1.0]

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023
  """
  t = gram.shape[0]
  dtype = gram.dtype
  # B is invariant to a global scale of K: work on K / max_i K_ii.
  k = normalize_gram(gram)
  lam, vec = jnp.linalg.eigh(k)  # ascending
  lam, vec = lam[::-1], vec[:, ::-1]  # descending
  tol = jnp.max(lam) * t * jnp.finfo(dtype).eps
  keep = lam > tol
  rank = jnp.sum(keep)
  safe = jnp.where(keep, lam, 1.0)
  if scale_mode == "min":
    star = jnp.take(lam, jnp.maximum(rank - 1, 0))
  elif scale_mode == "median":
    # torch.median: the lower of the two middle values for an even count.
    star = jnp.take(lam, jnp.maximum(rank - 1 - (rank - 1) // 2, 0))
  elif scale_mode == "rmse":
    star = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
  else:
    raise ValueError(f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(safe), 0.0)
  b = jnp.sqrt(jnp.clip(star, 0.0)) * (vec * inv_sqrt) @ vec.T
  b = jnp.where(rank > 0, b, jnp.eye(t, dtype=dtype))
  # A non-finite K has "rank 0" above; keep it non-finite instead.
  return jnp.where(jnp.all(jnp.isfinite(gram)), b, jnp.nan)


def aligned_mtl_weights(
  gram: jax.Array, *, scale_mode: str = "min", preference: jax.Array | None = None
) -> jax.Array:
  r"""Aligned-MTL weights on the raw gradients: ``B^T p`` (``B`` symmetric).

  The update is :math:`\sum_i p_i \hat g_i` with the aligned gradients
  :math:`\hat g_i = (B J)_i` and preference ``p`` (default ``1/T``), i.e.
  :math:`\sum_j (B p)_j g_j`.

  Args:
    gram: ``(T, T)`` Gram matrix.
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"`` (see
      :func:`aligned_mtl_balance`).
    preference: optional ``(T,)`` preference ``p`` (default ``1/T``).

  Returns:
    ``(T,)`` weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # B = diag(1/3, 1) (see aligned_mtl_balance) times p = (1/2, 1/2)
    >>> w = aligned_mtl_weights(jnp.diag(jnp.array([9., 1.])))
    >>> [round(float(x), 4) for x in w]
    [0.1667, 0.5]

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023
  """
  t = gram.shape[0]
  if preference is None:
    preference = jnp.full((t,), 1.0 / t, gram.dtype)
  return aligned_mtl_balance(gram, scale_mode) @ jnp.asarray(preference, gram.dtype)


def aligned_mtl(scale_mode: str = "min", *, num_tasks: int | None = None) -> Method:
  r"""Aligned-MTL (Senushkin et al., CVPR 2023, arXiv:2305.19000).

  Aligns the principal components of the gradient matrix: with
  :math:`J = U\Sigma W^\top` (rows = task gradients), the aligned gradients
  are :math:`\hat J = \sigma_\star U W^\top` (condition number one: rows
  orthogonal with equal norms :math:`\sigma_\star`, the smallest non-zero
  singular value by default), and the update is their mean
  :math:`\frac1T \sum_i \hat g_i`. In Gram space
  :math:`\hat J = B J` with :math:`B = \sqrt{\lambda_\star}
  V\Lambda^{-1/2}V^\top` from the eigendecomposition of ``K``, so the update
  is :math:`\sum_j (B\,\mathbf 1/T)_j\, g_j` (see
  :func:`aligned_mtl_balance`).

  Conventions match torchjd's ``AlignedMTL`` (mean preference, ``"min"``
  scale, eigenvalues below ``max * T * eps`` dropped). The paper writes the
  update as a sum with task weights ``w``; with equal weights that is ``T``
  times this mean. Not a non-conflicting method in general:
  :math:`\langle g_i, d\rangle = \frac{\sqrt{\lambda_\star}}{T}
  (K B \mathbf 1)_i = \frac{\sqrt{\lambda_\star}}{T}(V \Lambda^{1/2}
  V^\top \mathbf 1)_i` can be negative.

  Args:
    scale_mode: ``"min"`` (paper), ``"median"`` or ``"rmse"`` (mean
      eigenvalue, the original code).
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = aligned_mtl()
    >>> g = {"w": jnp.array([[3., 0.], [0., 1.]])}  # orthogonal rows
    >>> upd, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in upd["w"]]  # both rescaled to norm 1
    [0.5, 0.5]

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023
  """
  if scale_mode not in _SCALE_MODES:
    raise ValueError(f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
  check_num_tasks(num_tasks, "aligned_mtl")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return aligned_mtl_weights(gram, scale_mode=scale_mode), state

  return from_weighting(Weighting(empty_init, weights_fn, name="aligned_mtl", num_tasks=num_tasks))
