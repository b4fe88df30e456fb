r"""ConFIG: conflict-free updates from the pseudo-inverse of unit gradients.

Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics
Informed Neural Networks", ICLR 2025 (arXiv:2408.11104); torchjd's
``ConFIG``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import (
  check_num_tasks,
  empty_init,
  normalize_gram,
  pinv_psd,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["conflict_free", "conflict_free_weights"]


def conflict_free_weights(gram: jax.Array, *, preference: jax.Array | None = None) -> jax.Array:
  r"""ConFIG (Equation 2 of Liu et al.) as weights on the raw gradients.

  With unit gradients :math:`u_i = g_i / \|g_i\|` (rows of ``U``, zero for a
  zero gradient) and preferences ``p`` (default all ones), ConFIG's
  direction is :math:`b = U^{+} p` and the update

  .. math:: d = \Big(\sum_i g_i^\top \hat b\Big)\, \hat b, \qquad
     \hat b = b / \|b\|.

  In Gram space: :math:`U^+ p = U^\top (U U^\top)^+ p = J^\top c` with
  :math:`c = N^{-1} C^+ p`, ``N = diag(||g_i||)`` and ``C`` the cosine
  matrix :math:`N^{-1} K N^{-1}` (pseudo-inverse by :func:`pinv_psd`), so
  :math:`\|b\|^2 = c^\top K c` and

  .. math:: w = \frac{\mathbf 1^\top K c}{c^\top K c}\, c.

  Args:
    gram: ``(T, T)`` Gram matrix.
    preference: optional ``(T,)`` preference vector (default ones).

  Returns:
    ``(T,)`` weights (zero when every gradient is zero).

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (0, 2): b_hat = (1, 1) / sqrt(2), d = (1.5, 1.5)
    >>> # = 1.5 g_1 + 0.75 g_2
    >>> w = conflict_free_weights(jnp.array([[1., 0.], [0., 4.]]))
    >>> [round(float(x), 4) for x in w]
    [1.5, 0.75]

  References:
    Liu et al., `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
  """
  k = normalize_gram(gram)
  t = k.shape[0]
  dtype = k.dtype
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))
  live = norms > 0
  inv_norms = jnp.where(live, 1.0 / jnp.where(live, norms, 1.0), 0.0)
  cos = inv_norms[:, None] * k * inv_norms[None, :]
  p = jnp.ones((t,), dtype) if preference is None else jnp.asarray(preference, dtype)
  c = inv_norms * (pinv_psd(cos) @ p)
  kc = k @ c
  sq = c @ kc
  ok = sq > 0
  # Computed on K / max_i K_ii: the weights are invariant to a global scale
  # of K (c scales as s^(-1/2), the ratio as s^(1/2)).
  return jnp.where(ok, jnp.sum(kc) / jnp.where(ok, sq, 1.0), 0.0) * c


def conflict_free(*, preference: jax.Array | None = None, num_tasks: int | None = None) -> Method:
  r"""ConFIG (Liu, Chu, Thuerey, ICLR 2025, arXiv:2408.11104).

  The update is along :math:`\hat b`, the normalised least-squares solution
  of :math:`u_i^\top b = p_i` for the unit gradients :math:`u_i`: a
  direction with the same cosine to every task gradient (for ``p = 1``);
  its length is the sum of the projections of the gradients on it,
  :math:`d = (\sum_i g_i^\top \hat b)\, \hat b` (see
  :func:`conflict_free_weights`). When the unit gradients are linearly
  independent :math:`u_i^\top \hat b = p_i / \|b\| > 0` for every task
  (no conflict); when they are dependent the least-squares solution need
  not satisfy every equation and no guarantee holds (e.g. ``g_2 = -g_1``
  gives a direction orthogonal to both).

  Cost: the Gram matrix plus one ``T x T`` eigendecomposition
  (``O(T^3)``). Stateless, order-free, 1-homogeneous in the gradients.
  Same vector as torchjd's ``ConFIG`` (which forms the pseudo-inverse of
  the ``T x n`` unit Jacobian); the momentum variant (M-ConFIG) of the
  paper is not included.

  Args:
    preference: optional ``(T,)`` preference vector (default ones; injectable).
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = conflict_free()
    >>> g = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> [round(float(x), 4) for x in upd["w"]]  # along (1, 1), length 3/sqrt(2)
    [1.5, 1.5]

  References:
    Liu et al., `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
  """
  check_num_tasks(num_tasks, "conflict_free")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return conflict_free_weights(gram, preference=preference), state

  return from_weighting(
    Weighting(empty_init, weights_fn, name="conflict_free", num_tasks=num_tasks)
  )
