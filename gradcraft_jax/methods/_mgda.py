r"""MGDA: the minimum-norm point of the convex hull of the task gradients.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (arXiv:1810.04650); Désidéri, "Multiple-gradient descent
algorithm (MGDA) for multiobjective optimization", C. R. Math. 2012.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from gradcraft_jax.methods._common import check_int, check_num_tasks, empty_init, normalize_gram
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["mgda", "mgda_weights"]


def _affine_min_norm_pinv(k: jax.Array, support: jax.Array) -> jax.Array:
  """:func:`_affine_min_norm` for any support, also an affinely dependent
  one: the KKT system ``[[K_SS, 1], [1^T, 0]] [w; lam] = [0; 1]`` solved
  with a symmetric pseudo-inverse at the fixed shape ``(T + 1, T + 1)``
  (rows and columns off the support zeroed), which also handles singular
  ``K_SS`` (e.g. the origin in the affine hull of the support), and one
  step of iterative refinement.
  """
  t = k.shape[0]
  m = support.astype(k.dtype)
  a = jnp.zeros((t + 1, t + 1), k.dtype)
  a = a.at[:t, :t].set(m[:, None] * k * m[None, :])
  a = a.at[:t, t].set(m).at[t, :t].set(m)
  rhs = jnp.zeros((t + 1,), k.dtype).at[t].set(1.0)
  evals, evecs = jnp.linalg.eigh(a)
  cutoff = 10 * (t + 1) * jnp.finfo(k.dtype).eps * jnp.max(jnp.abs(evals))
  keep = jnp.abs(evals) > cutoff
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  solve = lambda b: (evecs * inv) @ (evecs.T @ b)
  x = solve(rhs)
  x = x + solve(rhs - a @ x)
  return x[:t] * m


def _affine_min_norm(k: jax.Array, support: jax.Array) -> jax.Array:
  r"""Minimiser of ``w^T K w`` over ``{sum w = 1, w = 0 off support}``.

  With ``K = P^T P``, the matrix ``K_SS + 1 1^T = [P_S; 1^T]^T [P_S; 1^T]``
  is positive definite exactly when the support's points are affinely
  independent, which Wolfe's algorithm maintains; then the solution of
  ``(K_SS + 1 1^T) v = 1`` gives ``w = v / (1^T v)`` (``K_SS v`` is a
  multiple of ``1``: the KKT conditions). One Cholesky factorisation at the
  fixed shape ``(T, T)`` (identity off the support) and one step of
  iterative refinement; if the factorisation breaks down (a support that
  float32 rounding made affinely dependent), the pseudo-inverse solve of
  :func:`_affine_min_norm_pinv` (an ``eigh``, ten times dearer) is used
  instead (``lax.cond``: only one branch runs).
  """
  m = support.astype(k.dtype)
  a = m[:, None] * (k + 1.0) * m[None, :] + jnp.diag(1.0 - m)
  factor = jnp.linalg.cholesky(a)
  solve = lambda b: jax.scipy.linalg.cho_solve((factor, True), b)
  v = solve(m)
  v = v + solve(m - a @ v)
  total = jnp.sum(v)
  w = v / jnp.where(total > 0, total, 1.0) * m
  ok = jnp.all(jnp.isfinite(w)) & (total > 0)
  return jax.lax.cond(ok, lambda: w, lambda: _affine_min_norm_pinv(k, support))


def _pairwise_frank_wolfe(k: jax.Array, w: jax.Array, iters: int) -> jax.Array:
  """Pairwise Frank-Wolfe steps (Lacoste-Julien and Jaggi, NeurIPS 2015).

  Moves mass from the worst used vertex ``s = argmax_{w_k > 0} (Kw)_k`` to
  the Frank-Wolfe vertex ``t = argmin_k (Kw)_k`` with an exact line search
  clipped to ``[0, w_s]``. Never increases ``w^T K w``.
  """
  diag = jnp.diagonal(k)

  def body(_, w):
    kw = k @ w
    to = jnp.argmin(kw)
    away = jnp.argmax(jnp.where(w > 0, kw, -jnp.inf))
    num = kw[away] - kw[to]
    den = diag[away] + diag[to] - 2.0 * k[away, to]
    gamma = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf)
    gamma = jnp.where(num > 0, jnp.minimum(gamma, w[away]), 0.0)
    return w.at[to].add(gamma).at[away].add(-gamma)

  return jax.lax.fori_loop(0, iters, body, w)


def mgda_weights(
  gram: jax.Array, *, num_iters: int | None = None, polish_iters: int = 200
) -> jax.Array:
  r"""Weights on the simplex of the min-norm point of the convex hull.

  Solves :math:`\min_{w \in \Delta} w^\top K w` (:math:`\Delta` the
  probability simplex) exactly with Wolfe's active-set algorithm ("Finding
  the nearest point in a polytope", Math. Programming 1976), in Gram space.
  The state is ``w`` and a support ("corral") ``S``; each iteration:

  * computes ``y``, the minimiser on the affine hull of ``S``
    (:func:`_affine_min_norm`);
  * if ``y > 0`` on ``S`` (major cycle): ``w = y``, and the vertex
    :math:`j = \arg\min_k (K w)_k` joins ``S`` if it improves, i.e.
    :math:`(Kw)_j < w^\top K w - \text{tol}` (the Frank-Wolfe vertex of
    Sener and Koltun's Algorithm 2); otherwise ``w`` is optimal and the
    iteration is a no-op;
  * otherwise (minor cycle): ``w`` moves towards ``y`` until a weight hits
    0, and the vertices with weight 0 leave ``S``.

  It terminates at the exact minimiser after finitely many iterations
  (typically fewer than ``2T``); Frank-Wolfe, used by the paper and torchjd,
  converges sublinearly and is slowest exactly when the optimum lies on a
  face (e.g. the origin inside the hull). Here the iteration count is fixed
  (``lax.fori_loop``; iterations after convergence change nothing). In
  float32 the affine solves of nearly degenerate supports can be inaccurate
  enough to stall the active set one vertex short, so ``polish_iters``
  pairwise Frank-Wolfe steps (Lacoste-Julien and Jaggi, NeurIPS 2015;
  never increasing the objective, linearly convergent) finish. ``K``
  is normalised by its largest diagonal entry first (the weights are scale
  invariant).

  Args:
    gram: ``(T, T)`` Gram matrix.
    num_iters: number of active-set iterations (static; default
      ``4 T + 10``).
    polish_iters: number of final pairwise Frank-Wolfe steps (static).

  Returns:
    ``(T,)`` weights on the simplex.

  Examples:
    >>> import jax.numpy as jnp
    >>> # orthogonal gradients of norms 1 and 2: min (1 - w)^2 + 4 w^2 at w = 0.2
    >>> w = mgda_weights(jnp.array([[1., 0.], [0., 4.]]))
    >>> [round(float(x), 4) for x in w]
    [0.8, 0.2]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_, Comptes Rendus Mathématique 2012
  """
  k = normalize_gram(gram)
  t = k.shape[0]
  dtype = k.dtype
  if num_iters is None:
    num_iters = 4 * t + 10
  tol = 100 * jnp.finfo(dtype).eps
  diag = jnp.diagonal(k)
  start = jnp.argmin(diag)
  w0 = jax.nn.one_hot(start, t, dtype=dtype)
  s0 = w0 > 0

  def body(_, carry):
    w, support = carry
    y = _affine_min_norm(k, support)
    interior = jnp.all(jnp.where(support, y > 0, True))
    # major cycle: move to y, maybe add the best vertex
    ky = k @ y
    j = jnp.argmin(ky)
    add = (ky[j] < y @ ky - tol) & ~support[j]
    major_support = support.at[j].set(support[j] | add)
    # minor cycle: step towards y until the first weight reaches 0
    leaving = support & (y <= 0)
    ratios = jnp.where(leaving, w / jnp.where(leaving, w - y, 1.0), jnp.inf)
    theta = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    w_minor = w + theta * (y - w)
    w_minor = jnp.where(support & (w_minor > tol), w_minor, 0.0)
    w_minor = w_minor / jnp.sum(w_minor)
    minor_support = w_minor > 0
    w = jnp.where(interior, y, w_minor)
    support = jnp.where(interior, major_support, minor_support)
    return w, support

  w, _ = jax.lax.fori_loop(0, num_iters, body, (w0, s0))
  return _pairwise_frank_wolfe(k, w, polish_iters)


def mgda(num_iters: int | None = None, *, num_tasks: int | None = None) -> Method:
  r"""MGDA: the min-norm convex combination of task gradients.

  The update is :math:`d = \sum_i w_i g_i` with
  :math:`w = \arg\min_{w \in \Delta} \|\sum_i w_i g_i\|^2`, solved in Gram
  space by Wolfe's exact active-set method (see :func:`mgda_weights`). ``d`` is a
  common descent direction: :math:`\langle d, g_i \rangle \ge \|d\|^2 \ge 0` for every task
  at the optimum. Scale: a convex combination (weights sum to 1), as in the
  paper and in torchjd's ``MGDA``, which returns the same vector. (The
  paper's MGDA-UB variant, which applies the same solver to representation
  gradients, is a choice of what to differentiate, not a different
  aggregator.)

  Args:
    num_iters: solver iterations (fixed; default ``4 T + 10``).
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation mapping stacked gradients ``(T, ...)`` to the
    min-norm combination.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = mgda()
    >>> upd, _ = tx.update({"w": jnp.array([[1., 0.], [0., 1.]])}, tx.init(None))
    >>> [round(float(x), 5) for x in upd["w"]]
    [0.5, 0.5]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_, Comptes Rendus Mathématique 2012
  """
  if num_iters is not None:
    check_int("num_iters", num_iters, low=1, method="mgda")
  check_num_tasks(num_tasks, "mgda")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return mgda_weights(gram, num_iters=num_iters), state

  return from_weighting(Weighting(empty_init, weights_fn, name="mgda", num_tasks=num_tasks))
