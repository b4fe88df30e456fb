r"""UPGrad: unconflicting projection of gradients.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232); the reference implementation is torchjd's ``UPGrad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_int,
  check_num_tasks,
  empty_init,
  pinv_psd,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["upgrad", "upgrad_weights", "dual_cone_weights"]


def _max_step(x: jax.Array, dx: jax.Array) -> jax.Array:
  """Largest ``a <= 1`` with ``x + a dx >= 0`` (``x > 0``)."""
  ratio = jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1.0), jnp.inf)
  return jnp.minimum(1.0, jnp.min(ratio))


def _box_qp(k: jax.Array, u: jax.Array, num_iters: int) -> jax.Array:
  r"""``w >= 0`` minimising ``(u + w)^T K (u + w)``: Mehrotra's primal-dual
  interior-point method with a fixed number of iterations, then one
  active-set polish.

  KKT conditions: ``z = K (u + w) >= 0``, ``w >= 0``, ``w * z = 0``. Each
  iteration solves the Newton system ``(K + diag(z / w)) dw = rhs`` in the
  scaled form ``(D K D + I) s = D rhs``, ``dw = D s``,
  ``D = diag(sqrt(w / z))`` (eigenvalues at least one: a well-conditioned
  Cholesky factorisation in float32).

  The polish then guesses the active set ``{j : z_j > w_j}``, solves the
  KKT equations on the free set exactly (pseudo-inverse, minimum-norm) and
  keeps that solution if it is feasible up to rounding, which removes the
  ``O(mu)`` bias the interior point leaves.
  """
  t = k.shape[0]
  dtype = k.dtype
  eye = jnp.eye(t, dtype=dtype)
  ku = k @ u

  def body(_, carry):
    w, z = carry
    r_d = ku + k @ w - z
    mu = jnp.dot(w, z) / t
    d = jnp.sqrt(w / z)
    m = d[:, None] * k * d[None, :] + eye
    chol = jax.scipy.linalg.cho_factor(m, lower=True)

    def newton(r_c):  # Z dw + W dz = -r_c;  K dw - dz = -r_d
      rhs = -r_d - r_c / w
      dw = d * jax.scipy.linalg.cho_solve(chol, d * rhs)
      dz = (-r_c - z * dw) / w
      return dw, dz

    dw_a, dz_a = newton(w * z)
    a_a = jnp.minimum(_max_step(w, dw_a), _max_step(z, dz_a))
    mu_a = jnp.dot(w + a_a * dw_a, z + a_a * dz_a) / t
    sigma = jnp.clip(mu_a / mu, 0.0, 1.0) ** 3
    dw, dz = newton(w * z + dw_a * dz_a - sigma * mu)
    a = 0.99 * jnp.minimum(_max_step(w, dw), _max_step(z, dz))
    new_w, new_z = w + a * dw, z + a * dz
    ok = jnp.all(new_w > 0) & jnp.all(new_z > 0)
    return jnp.where(ok, new_w, w), jnp.where(ok, new_z, z)

  ones = jnp.ones((t,), dtype)
  w, z = jax.lax.fori_loop(0, num_iters, body, (ones, ones))

  free = (w >= z).astype(dtype)
  kf = free[:, None] * k * free[None, :]
  w_pol = -free * (pinv_psd(kf) @ ku)
  z_pol = ku + k @ w_pol
  tol = 1e3 * jnp.finfo(dtype).eps * (1.0 + jnp.max(jnp.abs(w_pol)))
  feasible = jnp.all(w_pol >= -tol) & jnp.all(z_pol >= -tol)
  return jnp.where(feasible, jnp.clip(w_pol, 0.0), w)


def dual_cone_weights(
  gram: jax.Array, u: jax.Array, *, num_iters: int = 20, reg_eps: float = 0.0
) -> jax.Array:
  r"""Weights ``v`` of the projection of ``J^T u`` onto the dual cone.

  The dual cone of the rows of ``J`` is :math:`\{x : Jx \ge 0\}`. By
  Proposition 1 of Quinton and Rey, the projection of :math:`J^\top u`
  onto it is :math:`J^\top v` with

  .. math:: v = \arg\min_{v \ge u} v^\top K v, \qquad K = J J^\top,

  a box-constrained QP in ``T`` variables, solved by :func:`_box_qp` for
  ``w = v - u >= 0`` on ``K / tr(K) + reg_eps * I`` (the scale does not
  change ``v``; ``reg_eps`` is torchjd's regularisation, 0 by default).

  Args:
    gram: ``(T, T)`` Gram matrix.
    u: ``(T,)`` weights of the vector to project.
    num_iters: interior-point iterations (static).
    reg_eps: ridge added to the trace-normalised Gram matrix.

  Returns:
    ``(T,)`` weights ``v >= u``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (-2, 0.5), u = (1/2, 1/2): v = (1, 1/2), and
    >>> # K v = (<g_1, d>, <g_2, d>) = (0, 1/8) >= 0 with d = J^T v
    >>> k = jnp.array([[1., -2.], [-2., 4.25]])
    >>> v = dual_cone_weights(k, jnp.array([0.5, 0.5]))
    >>> [round(float(x), 4) for x in v], round(float((k @ v)[1]), 4)
    ([1.0, 0.5], 0.125)

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  t = gram.shape[0]
  dtype = gram.dtype
  tr = jnp.trace(gram)
  k = gram / jnp.where(tr > 0, tr, 1.0) + reg_eps * jnp.eye(t, dtype=dtype)
  return u + _box_qp(k, u, num_iters)


def upgrad_weights(
  gram: jax.Array, *, preference: jax.Array | None = None, num_iters: int = 20, reg_eps: float = 0.0
) -> jax.Array:
  r"""UPGrad weights: ``sum_i v^{(i)}`` with ``v^{(i)}`` the dual-cone
  projection weights of ``p_i g_i`` (:func:`dual_cone_weights` with
  ``u = p_i e_i``), all ``T`` QPs solved at once with ``vmap``.

  Args:
    gram: ``(T, T)`` Gram matrix.
    preference: ``(T,)`` preference weights, default ``1/T`` (the mean).
    num_iters: interior-point iterations (static).
    reg_eps: ridge on the trace-normalised Gram matrix (torchjd: 1e-4).

  Returns:
    ``(T,)`` weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (-1, 1): their projections onto the dual cone
    >>> # are (.5, .5) = g_1 + g_2 / 2 and (0, 1) = g_1 + g_2; the mean of
    >>> # the two has weights (1, 3/4)
    >>> w = upgrad_weights(jnp.array([[1., -1.], [-1., 2.]]))
    >>> [round(float(x), 4) for x in w]
    [1.0, 0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  t = gram.shape[0]
  dtype = gram.dtype
  if preference is None:
    preference = jnp.full((t,), 1.0 / t, dtype)
  preference = jnp.asarray(preference, dtype)
  # Solve for u = e_i (better scaled), then multiply by p_i: v is linear
  # in u for u = p_i e_i, p_i >= 0.
  eye = jnp.eye(t, dtype=dtype)
  v = jax.vmap(lambda e: dual_cone_weights(gram, e, num_iters=num_iters, reg_eps=reg_eps))(eye)
  return preference @ v


def upgrad(*, num_iters: int = 20, reg_eps: float = 0.0, num_tasks: int | None = None) -> Method:
  r"""UPGrad (Quinton and Rey, 2024, arXiv:2406.16232).

  The update is the mean of the projections of the task gradients onto the
  dual cone of all of them,

  .. math:: d = \frac1T \sum_i \pi_J(g_i), \qquad
     \pi_J(x) = \arg\min_{y:\, Jy \ge 0} \|y - x\|,

  so :math:`\langle g_j, d\rangle \ge 0` for every task ``j``
  (non-conflicting), and ``d = mean`` when no two gradients conflict. Each
  projection is :math:`J^\top v^{(i)}` with ``v^{(i)}`` the solution of the
  box-constrained QP :math:`\min_{v \ge e_i/T} v^\top K v` (see
  :func:`dual_cone_weights`), solved in Gram space by a fixed-iteration
  interior-point method plus an exact active-set polish, for all ``T`` tasks
  at once with ``vmap``: ``O(T * num_iters * T^3)`` work, independent of the
  number of parameters.

  Versus torchjd's ``UPGrad`` (quadprog on ``K / tr(K) + 1e-4 I``): with
  ``reg_eps=1e-4`` both solve the same QPs; with the default
  ``reg_eps=0`` this solves the paper's unregularised problem (which is
  what guarantees :math:`\langle g_j, d\rangle \ge 0` exactly; the ridge
  allows :math:`\langle g_j, d\rangle \approx -10^{-4} \operatorname{tr}(K)
  v_j`).

  Args:
    num_iters: interior-point iterations (static Python int).
    reg_eps: ridge on the trace-normalised Gram matrix, ``>= 0``.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = upgrad()
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> upd, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(float(x), 4) for x in upd["w"]]  # mean of (.5, .5) and (0, 1)
    [0.25, 0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  check_int("num_iters", num_iters, low=1, method="upgrad")
  check_hyperparameter("reg_eps", reg_eps, low=0.0, method="upgrad")
  check_num_tasks(num_tasks, "upgrad")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return upgrad_weights(gram, num_iters=num_iters, reg_eps=reg_eps), state

  return from_weighting(Weighting(empty_init, weights_fn, name="upgrad", num_tasks=num_tasks))
