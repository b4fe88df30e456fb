r"""Nash-MTL: multi-task learning as a bargaining game.

Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022
(arXiv:2202.01017).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_int,
  check_num_tasks,
  empty_init,
  gram_scale,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["nash_mtl", "nash_mtl_weights"]


def _newton_solve(k: jax.Array, num_iters: int) -> jax.Array:
  """Minimises ``f(a) = a^T K a / 2 - sum_i log a_i`` over ``a > 0``.

  ``K`` must be positive definite (the caller adds a ridge). ``f`` is
  strictly convex and self-concordant, so Nesterov's damped Newton method
  (step ``1 / (1 + lambda)`` with ``lambda`` the Newton decrement, full steps
  once ``lambda < 1/4``) stays strictly positive and converges from any
  start: at least ``lambda - log(1 + lambda)`` decrease per damped step,
  quadratic convergence afterwards.

  The Newton system ``(K + diag(1/a^2)) delta = -(K a - 1/a)`` is solved in
  the scaled variable ``delta = a * s``:
  ``(D K D + I) s = 1 - a * (K a)`` with ``D = diag(a)``, a matrix whose
  eigenvalues are all at least one, which keeps float32 accurate.
  """
  t = k.shape[0]
  dtype = k.dtype
  eye = jnp.eye(t, dtype=dtype)
  # Start on the best multiple of v = diag(K)^(-1/2) (exact for orthogonal
  # gradients): f(c v) is minimised by c = sqrt(T / v^T K v).
  v = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(k), jnp.finfo(dtype).tiny))
  a0 = v * jnp.sqrt(t / (v @ k @ v))

  def body(_, a):
    r = 1.0 - a * (k @ a)
    m = a[:, None] * k * a[None, :] + eye
    chol = jax.scipy.linalg.cho_factor(m, lower=True)
    s = jax.scipy.linalg.cho_solve(chol, r)
    lam = jnp.sqrt(jnp.clip(r @ s, 0.0))
    step = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
    new = a * (1.0 + step * s)
    # Exact arithmetic never leaves a > 0 (|step * s_i| < 1); guard
    # against rounding anyway.
    return jnp.where(jnp.all(new > 0), new, a)

  return jax.lax.fori_loop(0, num_iters, body, a0)


def nash_mtl_weights(
  gram: jax.Array, *, num_iters: int = 20, ridge: float = 1e-6, max_norm: float = 0.0
) -> jax.Array:
  r"""Nash bargaining weights: the ``alpha > 0`` with ``K alpha = 1/alpha``.

  The Nash bargaining solution of Navon et al. is the update
  :math:`d = \sum_i \alpha_i g_i` whose weights satisfy
  :math:`\langle g_i, d \rangle = 1/\alpha_i` for every task, i.e.
  :math:`K\alpha = 1/\alpha` elementwise. That equation is the
  stationarity condition of the strictly convex function

  .. math:: f(\alpha) = \tfrac12 \alpha^\top K \alpha - \sum_i \log\alpha_i,
     \qquad \alpha > 0,

  which is minimised here by a fixed number of damped Newton steps (see
  ``_newton_solve``; on random well-conditioned problems 20 steps reach
  ``|K alpha - 1/alpha| / (1/alpha) < 1e-5``).

  The solve runs on :math:`\hat K = K / s` with :math:`s = \max_i K_{ii}`
  plus ``ridge * I``; since :math:`\alpha(K/s) = \sqrt{s}\,\alpha(K)`, the
  returned weights are :math:`\hat\alpha / \sqrt{s}`. The ridge makes the
  solution exist when the gradients are linearly dependent with a positive
  combination equal to zero (e.g. ``g_2 = -g_1``: there is no solution of
  ``K alpha = 1/alpha``, the official cvxpy code then fails or stops). It
  shifts the solution by a relative ``O(ridge / lambda_min(K_hat))``.

  Args:
    gram: ``(T, T)`` Gram matrix.
    num_iters: number of Newton steps (static).
    ridge: relative ridge added to the normalised Gram matrix.
    max_norm: if positive, the weights are scaled down so that
      ``||sum_i alpha_i g_i|| <= max_norm`` (the official code's and
      torchjd's ``max_norm``, default 1.0 there; at the exact solution
      ``||d||^2 = alpha^T K alpha = T``). 0 disables it.

  Returns:
    ``(T,)`` positive weights ``alpha``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # orthogonal gradients of norms 2 and 1: K alpha = 1 / alpha gives
    >>> # alpha_i = 1 / ||g_i||
    >>> w = nash_mtl_weights(jnp.array([[4., 0.], [0., 1.]]))
    >>> [round(float(x), 4) for x in w]
    [0.5, 1.0]

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_,
    ICML 2022
  """
  dtype = gram.dtype
  t = gram.shape[0]
  scale = gram_scale(gram)
  k = gram / scale + jnp.asarray(ridge, dtype) * jnp.eye(t, dtype=dtype)
  alpha = _newton_solve(k, num_iters) / jnp.sqrt(scale)
  if isinstance(max_norm, (int, float)) and max_norm == 0:
    return alpha
  norm = jnp.sqrt(jnp.clip(alpha @ gram @ alpha, 0.0))
  bound = jnp.asarray(max_norm, dtype)
  clip = (bound > 0) & (norm > bound)
  return jnp.where(clip, alpha * bound / jnp.where(clip, norm, 1.0), alpha)


def nash_mtl(
  num_iters: int = 20, *, ridge: float = 1e-6, max_norm: float = 0.0, num_tasks: int | None = None
) -> Method:
  r"""Nash-MTL (Navon et al., ICML 2022, arXiv:2202.01017).

  The update is :math:`d = \sum_i \alpha_i g_i` with :math:`\alpha > 0`
  solving :math:`K\alpha = 1/\alpha` (:math:`K_{ij} = \langle g_i, g_j
  \rangle`): every task's directional derivative
  :math:`\langle g_i, d\rangle = 1/\alpha_i` is positive, and tasks with a
  small gradient get a large weight. Solved in Gram space by damped Newton
  on a self-concordant convex function, a fixed ``num_iters`` steps (see
  :func:`nash_mtl_weights`).

  Differences from the official code (and torchjd's ``NashMTL``): they solve
  the same equation approximately with a sequence of convex problems
  (cvxpy/ECOS, up to 20 warm-started solves, early stopping); this solves it
  to float precision from scratch every step (no state, no
  ``update_weights_every``), with a tiny ridge so that dependent gradients
  still give a finite answer. ``max_norm`` defaults to 0 (off) here; the
  official default ``max_norm=1.0`` rescales every update to norm 1 since
  the exact solution has norm ``sqrt(T)``.

  Args:
    num_iters: Newton steps (static Python int).
    ridge: relative ridge on the normalised Gram matrix, ``>= 0``.
    max_norm: clip the update norm to this value, ``0`` to disable.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = nash_mtl()
    >>> g = {"w": jnp.array([[2., 0.], [0., 1.]])}
    >>> upd, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in upd["w"]]  # alpha_i = 1 / ||g_i||
    [1.0, 1.0]

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_,
    ICML 2022
  """
  check_int("num_iters", num_iters, low=1, method="nash_mtl")
  check_hyperparameter("ridge", ridge, low=0.0, method="nash_mtl")
  check_hyperparameter("max_norm", max_norm, low=0.0, method="nash_mtl")
  check_num_tasks(num_tasks, "nash_mtl")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return nash_mtl_weights(gram, num_iters=num_iters, ridge=ridge, max_norm=max_norm), state

  return from_weighting(Weighting(empty_init, weights_fn, name="nash_mtl", num_tasks=num_tasks))
