r"""FairGrad: alpha-fair resource allocation among tasks.

Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
(arXiv:2402.15638); torchjd's ``FairGrad`` (which solves the same equation
with ``scipy.optimize.least_squares``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_num_tasks,
  empty_init,
  gram_scale,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["fairgrad", "fairgrad_weights"]

# Candidate step sizes of the vectorised line search of each Newton step.
_STEPS = 2.0 ** -jnp.arange(12)


def _utility_change(w: jax.Array, delta: jax.Array, p: jax.Array) -> jax.Array:
  r""":math:`\sum_i h(w_i + \delta_i) - h(w_i)` with :math:`h'(w) = w^{-p}`,
  in a form accurate for small steps:
  :math:`w^q \operatorname{expm1}(q \log(1 + \delta/w)) / q`, ``q = 1 - p``
  (:math:`\log(1 + \delta/w)` at ``q = 0``, its limit)."""
  r = jnp.log1p(delta / w)
  q = 1.0 - p
  small = jnp.abs(q) <= 1e-6
  safe_q = jnp.where(small, 1.0, q)
  change = jnp.where(small, r, w**q * jnp.expm1(q * r) / safe_q)
  return jnp.sum(change)


def _newton_solve(k: jax.Array, p: jax.Array, num_iters: int) -> jax.Array:
  r"""Minimises :math:`f(w) = \frac12 w^\top K w - \sum_i h(w_i)` over
  ``w > 0`` (``K`` positive definite, ``p = 1/alpha > 0``).

  Newton steps on the Hessian :math:`K + p\,\mathrm{diag}(w^{-p-1})`, solved
  in the scaled form :math:`(D K D + I) s = -D \nabla f`, ``delta = D s``,
  :math:`D = \mathrm{diag}(\sqrt{w^{p+1}/p})` (eigenvalues at least one: a
  well-conditioned Cholesky factorisation in float32). The step length is
  the one of the 12 candidates ``1, 1/2, ..., 1/2048`` (evaluated at once)
  that keeps ``w > 0`` and decreases ``f`` most, the change of ``f`` being
  computed directly (not as a difference of two values of ``f``) so that
  it stays accurate next to the solution; no move if none decreases ``f``.
  """
  t = k.shape[0]
  dtype = k.dtype
  eye = jnp.eye(t, dtype=dtype)
  tiny = jnp.finfo(dtype).tiny
  # Start on the best multiple of v = diag(K)^(-1/2): f(c v) is minimised by
  # c^(1+p) = sum_i v_i^(1-p) / v^T K v (exact for orthogonal gradients).
  v = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(k), tiny))
  c = (jnp.sum(v ** (1.0 - p)) / (v @ k @ v)) ** (1.0 / (1.0 + p))
  w0 = c * v
  steps = _STEPS.astype(dtype)

  def body(_, w):
    kw = k @ w
    grad = kw - w ** (-p)
    d = jnp.sqrt(w ** (p + 1.0) / p)
    m = d[:, None] * k * d[None, :] + eye
    chol = jax.scipy.linalg.cho_factor(m, lower=True)
    delta = -d * jax.scipy.linalg.cho_solve(chol, d * grad)
    lin, quad = delta @ kw, 0.5 * (delta @ k @ delta)

    def change(step):  # f(w + step * delta) - f(w)
      return step * lin + step**2 * quad - _utility_change(w, step * delta, p)

    ok = jnp.all(w[None, :] + steps[:, None] * delta[None, :] > 0, axis=1)
    vals = jax.vmap(change)(jnp.where(ok, steps, 0.0))
    vals = jnp.where(ok & jnp.isfinite(vals), vals, jnp.inf)
    best = jnp.argmin(vals)
    return jnp.where(vals[best] <= 0, w + steps[best] * delta, w)

  return jax.lax.fori_loop(0, num_iters, body, w0)


def fairgrad_weights(
  gram: jax.Array, *, alpha=1.0, num_iters: int = 25, ridge: float = 1e-6
) -> jax.Array:
  r"""FairGrad weights: the ``w > 0`` with :math:`(K w)_i = w_i^{-1/\alpha}`.

  Equation 4 of Ban and Ji: the update :math:`d = \sum_i w_i g_i` is the
  alpha-fair allocation of progress :math:`\langle g_i, d\rangle` among the
  tasks, :math:`\langle g_i, d\rangle = w_i^{-1/\alpha}`. With
  :math:`p = 1/\alpha` this is the stationarity condition of the strictly
  convex function (on ``w > 0``, for ``K`` positive definite)

  .. math:: f(w) = \tfrac12 w^\top K w - \sum_i h(w_i), \qquad
     h(w) = \frac{w^{1-p}}{1-p}\ (p \ne 1), \quad h(w) = \log w\ (p = 1),

  minimised by ``num_iters`` Newton steps with a vectorised line search
  (``alpha = 1`` is Nash-MTL's equation :math:`K w = 1/w`).

  The solve runs on :math:`\hat K = K/s + \text{ridge}\, I`,
  :math:`s = \max_i K_{ii}`; since :math:`w(K/s) = s^{1/(1+p)} w(K)`, the
  returned weights are :math:`\hat w\, s^{-1/(1+p)}`. The ridge makes a
  solution exist when a positive combination of the gradients vanishes
  (e.g. ``g_2 = -g_1``, or a zero gradient, whose weight becomes
  :math:`\text{ridge}^{-1/(1+p)}` and multiplies a zero vector).

  **Accuracy** (measured with ``tests/test_fairgrad.py``'s
  reference: ``scipy.optimize.least_squares`` in float64, tolerances 1e-15,
  on the same ridged system): over 30 random Gram matrices with ``T`` from
  2 to 16, condition numbers up to ``2e4`` and ``alpha`` in
  ``{0.5, 1, 2, 5}``, the default 25 steps give weights within ``1e-13``
  relative in float64 and ``3e-6`` relative in float32 (Newton converges
  quadratically; the test asserts ``1e-10`` and ``1e-4``).

  Args:
    gram: ``(T, T)`` Gram matrix.
    alpha: fairness parameter ``alpha >= 0`` (1: proportional fairness,
      large: max-min fairness). ``alpha = 0`` gives the uniform weights
      ``1/T`` (linear scalarisation, Section 3 of the paper; as torchjd).
    num_iters: Newton steps (static).
    ridge: relative ridge added to the normalised Gram matrix.

  Returns:
    ``(T,)`` positive weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # orthogonal gradients of norms 1 and 4: n_i^2 w_i = w_i^(-1/alpha)
    >>> # gives w_i = n_i^(-2 / (1 + 1/alpha)): 1/n_i for alpha = 1
    >>> k = jnp.diag(jnp.array([1., 16.]))
    >>> [round(float(x), 4) for x in fairgrad_weights(k, alpha=1.0)]
    [1.0, 0.25]

  References:
    Ban and Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://openreview.net/forum?id=KLmWRMg6nL>`_, ICML 2024
  """
  dtype = gram.dtype
  t = gram.shape[0]
  alpha = jnp.asarray(alpha, dtype)
  linear = alpha <= 0
  p = 1.0 / jnp.where(linear, 1.0, alpha)
  scale = gram_scale(gram)
  k = gram / scale + jnp.asarray(ridge, dtype) * jnp.eye(t, dtype=dtype)
  w = _newton_solve(k, p, num_iters) * scale ** (-1.0 / (1.0 + p))
  return jnp.where(linear, jnp.full((t,), 1.0 / t, dtype), w)


def fairgrad(
  alpha: float = 1.0,
  *,
  num_iters: int = 25,
  ridge: float = 1e-6,
  num_tasks: int | None = None,
) -> Method:
  r"""FairGrad (Ban and Ji, ICML 2024, arXiv:2402.15638).

  The update is :math:`d = \sum_i w_i g_i` with ``w > 0`` solving
  :math:`(K w)_i = w_i^{-1/\alpha}` (Algorithm 1 and Equation 4 of the
  paper): the progress of every task, :math:`\langle g_i, d\rangle =
  w_i^{-1/\alpha}`, is positive at an exact solution, and ``alpha`` trades
  total progress (``alpha -> 0``: the mean) for fairness (``alpha = 1``:
  Nash-MTL's proportional fairness; ``alpha -> inf``: max-min). Solved in
  Gram space by a fixed number of Newton steps on a strictly convex
  function (see :func:`fairgrad_weights` for the math and the accuracy).

  Cost: the Gram matrix plus ``num_iters`` ``T x T`` Cholesky solves
  (``O(num_iters * T^3)``), independent of the number of parameters.
  Stateless. The weights scale as :math:`s^{-1/(1+1/\alpha)}` when the Gram
  matrix scales by ``s``, so the update is not scale-invariant (it scales
  by :math:`c^{(1-\alpha)/(1+\alpha)}` when the gradients scale by ``c``).

  Versus the official code and torchjd (``least_squares`` on the residual
  :math:`K w - w^{-1/\alpha}` with ``w >= 0``, started at ``1/T``): the same
  equation, solved here to float precision with a tiny ridge so that
  dependent gradients still give a finite answer (least squares then
  returns an approximate point with a nonzero residual).

  Args:
    alpha: fairness parameter ``>= 0`` (injectable).
    num_iters: Newton steps (static Python int).
    ridge: relative ridge on the normalised Gram matrix, ``>= 0``.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = fairgrad(alpha=2.0)
    >>> g = {"w": jnp.array([[1., 0.], [0., 4.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> # orthogonal gradients: w_i = ||g_i||^(-2 / (1 + 1/alpha))
    >>> [round(float(x), 4) for x in upd["w"]]
    [1.0, 0.63]

  References:
    Ban and Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://openreview.net/forum?id=KLmWRMg6nL>`_, ICML 2024
  """
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"fairgrad: num_iters must be a positive int, got {num_iters!r}")
  check_hyperparameter("alpha", alpha, low=0.0, method="fairgrad")
  check_hyperparameter("ridge", ridge, low=0.0, method="fairgrad")
  check_num_tasks(num_tasks, "fairgrad")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return fairgrad_weights(gram, alpha=alpha, num_iters=num_iters, ridge=ridge), state

  return from_weighting(Weighting(empty_init, weights_fn, name="fairgrad", num_tasks=num_tasks))
