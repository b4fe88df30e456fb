r"""GradCraft: magnitude alignment and global direction deconfliction.

Bai et al., "GradCraft: Elevating Multi-task Recommendations through Holistic
Gradient Crafting", KDD 2024 (arXiv:2407.19682).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import accumulation_dtype, is_concrete_number
from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_num_tasks,
  magnitude_scale,
  normalize_gram,
  pinv_psd,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["gradcraft", "gradcraft_weights", "gradcraft_coefficients", "GradCraftState"]


class GradCraftState(NamedTuple):
  """State of :func:`gradcraft` with ``norm_decay > 0``.

  Attributes:
    norm_ema: ``(T,)`` exponential moving average of the task-gradient norms,
      ``n <- b * n + (1 - b) * ||g||``, starting from zero.
  """

  norm_ema: jax.Array


def gradcraft_coefficients(
  gram: jax.Array, *, tau, eps, norms: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  r"""GradCraft's magnitude factors and projection coefficients.

  With magnitude factors :math:`s_i = \tau \max_j n_j / n_i + 1 - \tau`
  (:math:`n_i = \|g_i\|`, or the averaged norms when given), the adjusted
  gradients are :math:`\hat g_i = s_i g_i` and their Gram matrix is
  :math:`H = S K S`. Task ``i`` conflicts with the set
  :math:`C_i = \{k : H_{ik} < 0\}`. The deconflicted gradient is
  :math:`\tilde g_i = \hat g_i + \sum_{k \in C_i} W_{ik} \hat g_k` where
  :math:`W_{i,C_i}` is the minimum-norm solution of

  .. math:: H_{C_i C_i} w = -H_{C_i i} + \epsilon \|\hat g_i\|
     \|\hat g_{C_i}\|,

  i.e. :math:`\langle \tilde g_i, \hat g_k \rangle = \epsilon
  \|\hat g_i\| \|\hat g_k\|` for every :math:`k \in C_i`. All ``T``
  masked systems are solved at once with ``vmap`` at the fixed shape
  ``(T, T)``: rows and columns outside :math:`C_i` are zeroed and the
  pseudo-inverse (:func:`~gradcraft_jax.methods.pinv_psd`) maps them to zero. Each
  system is solved in the basis of the unit conflicting gradients (Jacobi
  scaling), so its conditioning depends on their angles, not their norms;
  when they are linearly dependent the pseudo-inverse picks one solution,
  and :math:`\tilde g_i` is the same for every solution.

  Args:
    gram: ``(T, T)`` Gram matrix ``K`` of the raw task gradients.
    tau: magnitude-alignment strength in ``[0, 1]``.
    eps: similarity target ``>= 0``.
    norms: optional ``(T,)`` norms used for the magnitude factors in place of
      ``sqrt(diag(K))``.

  Returns:
    ``(s, W)``: the ``(T,)`` magnitude factors and the ``(T, T)`` projection
    coefficients (``W[i, k]`` is zero unless ``k`` conflicts with ``i``).

  Examples:
    >>> import jax.numpy as jnp
    >>> # norms 2 and 1 at 120 degrees; tau = 1 scales g_2 by 2 (equal norms),
    >>> # then each adjusted gradient gets half of the other: <g~_i, g^_k> = 0
    >>> s, w = gradcraft_coefficients(jnp.array([[4., -1.], [-1., 1.]]), tau=1.0, eps=0.0)
    >>> [round(float(x), 4) for x in s], round(float(w[0, 1]), 4), round(float(w[1, 0]), 4)
    ([1.0, 2.0], 0.5, 0.5)

  References:
    Bai et al., `GradCraft: Elevating Multi-task Recommendations through Holistic Gradient Crafting
    <https://arxiv.org/abs/2407.19682>`_, KDD 2024
  """
  dtype = gram.dtype
  # W is invariant to a global scale of K: normalise so that the solve works
  # for gradients from 1e-12 to 1e12 alike.
  k = normalize_gram(gram)
  raw_norms = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))
  n = raw_norms if norms is None else jnp.asarray(norms, dtype)
  s = magnitude_scale(n, jnp.asarray(tau, dtype))
  h = s[:, None] * k * s[None, :]
  hat_norms = s * raw_norms
  conflict = h < 0  # (T, T); the diagonal is never negative
  eps = jnp.asarray(eps, dtype)

  # Jacobi scaling: solve in the basis of unit conflicting gradients, so the
  # conditioning depends on their angles only, not on their norms.
  inv_norms = jnp.where(hat_norms > 0, 1.0 / jnp.where(hat_norms > 0, hat_norms, 1.0), 0.0)

  def solve_one(mask_i, h_col_i, hat_norm_i):
    r = mask_i.astype(dtype) * inv_norms
    cos = r[:, None] * h * r[None, :]
    rhs = r * (-h_col_i + eps * hat_norm_i * hat_norms)
    return r * (pinv_psd(cos) @ rhs)

  w = jax.vmap(solve_one)(conflict, h, hat_norms)
  return s, w


def gradcraft_weights(gram: jax.Array, *, tau, eps, norms: jax.Array | None = None) -> jax.Array:
  r"""GradCraft's update as task weights on the raw gradients.

  The update :math:`\frac1T \sum_i \tilde g_i` (see
  :func:`gradcraft_coefficients`) equals :math:`\sum_k c_k g_k` with

  .. math:: c_k = \frac{s_k}{T} \Bigl(1 + \sum_i W_{ik}\Bigr).

  Args:
    gram: ``(T, T)`` Gram matrix ``K`` of the raw task gradients.
    tau: magnitude-alignment strength in ``[0, 1]``.
    eps: similarity target ``>= 0`` (0 gives orthogonal projections).
    norms: optional ``(T,)`` norms used for the magnitude factors in place of
      ``sqrt(diag(K))`` (GradCraft's moving-average option).

  Returns:
    ``(T,)`` weights ``c`` such that the GradCraft update is
    ``sum_k c_k g_k``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # two unit gradients at 120 degrees, tau = 0, eps = 0: each is projected
    >>> # onto the normal of the other (PCGrad); the mean has weights 0.75, 0.75.
    >>> k = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
    >>> gradcraft_weights(k, tau=0.0, eps=0.0)
    Array([0.75, 0.75], dtype=float32)

  References:
    Bai et al., `GradCraft: Elevating Multi-task Recommendations through Holistic Gradient Crafting
    <https://arxiv.org/abs/2407.19682>`_, KDD 2024
  """
  s, w = gradcraft_coefficients(gram, tau=tau, eps=eps, norms=norms)
  return s * (1.0 + jnp.sum(w, axis=0)) / gram.shape[0]


def gradcraft(
  tau: float = 0.5, eps: float = 0.0, norm_decay: float = 0.0, *, num_tasks: int | None = None
) -> Method:
  r"""GradCraft (Bai et al., KDD 2024) over stacked per-task gradients.

  1. Magnitude adjustment towards the largest norm:
     :math:`\hat g_i = \tau \frac{\max_j \|g_j\|}{\|g_i\|} g_i + (1-\tau) g_i`,
     so adjusted norms are within a factor :math:`1/\tau` of each other.
  2. Global direction deconfliction, for every task at once: with
     :math:`G_i` the adjusted gradients that conflict with :math:`\hat g_i`
     (negative inner product),
     :math:`\tilde g_i = \hat g_i + w^\top G_i`,
     :math:`w = (G_i G_i^\top)^{+}(-G_i \hat g_i^\top + z)`,
     :math:`z_k = \epsilon \|\hat g_i\| \|\hat g_k\|` (pseudo-inverse: the
     minimum-norm solution when conflicting gradients are dependent).
  3. The update is :math:`\frac1T \sum_i \tilde g_i`.

  Everything is computed from the ``T x T`` Gram matrix (see
  :func:`gradcraft_weights`), then applied as one weighted sum.

  Args:
    tau: magnitude-alignment strength in ``[0, 1]`` (0: no alignment, 1: all
      norms equal to the largest). Injectable with
      ``optax.inject_hyperparams``.
    eps: non-negative similarity target of the projection (0: orthogonal).
      Injectable.
    norm_decay: ``b`` in ``[0, 1)``. With ``b > 0`` the norms used in step 1
      are moving averages ``n <- b n + (1 - b) ||g||`` kept in the state
      (the reference implementation's option); ``b = 0`` is the paper's
      behaviour.
    num_tasks: the task count ``T``; required when ``norm_decay > 0`` (the
      state holds ``T`` averaged norms), unused otherwise. With
      ``optax.inject_hyperparams`` every numeric argument is injected; the
      state's structure is fixed in ``init``, so ``tau``, ``eps`` and
      ``norm_decay`` may all be changed between steps.

  Returns:
    An optax transformation: ``update(stacked_grads, state, params=None)``
    maps a pytree whose leaves have shape ``(T, ...)`` to one like the
    parameters (same dtypes).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(gradcraft(tau=0.5, eps=0.1), optax.sgd(1.0))
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> upd, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> upd["w"].shape
    (2,)

  References:
    Bai et al., `GradCraft: Elevating Multi-task Recommendations through Holistic Gradient Crafting
    <https://arxiv.org/abs/2407.19682>`_, KDD 2024
  """
  check_hyperparameter("tau", tau, low=0.0, high=1.0, method="gradcraft")
  check_hyperparameter("eps", eps, low=0.0, method="gradcraft")
  check_hyperparameter(
    "norm_decay", norm_decay, low=0.0, high=1.0, high_open=True, method="gradcraft"
  )
  check_num_tasks(num_tasks, "gradcraft")
  # The state's structure is decided in init, where every hyperparameter is
  # concrete (also under optax.inject_hyperparams); update follows the state.
  averaged = not (is_concrete_number(norm_decay) and float(norm_decay) == 0)
  if averaged and is_concrete_number(norm_decay) and num_tasks is None:
    raise ValueError(
      "gradcraft: norm_decay > 0 keeps T averaged norms in the state; pass num_tasks=T"
    )

  def init_fn(params):
    if not averaged:
      return optax.EmptyState()
    if num_tasks is None or not is_concrete_number(num_tasks):
      raise ValueError(f"gradcraft: norm_decay > 0 needs a concrete num_tasks, got {num_tasks!r}")
    dtype = accumulation_dtype(params)
    return GradCraftState(norm_ema=jnp.zeros((int(num_tasks),), dtype))

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    if not isinstance(state, GradCraftState):
      return gradcraft_weights(gram, tau=tau, eps=eps), state
    if state.norm_ema.shape[0] != gram.shape[0]:
      raise ValueError(
        f"gradcraft: built for num_tasks={state.norm_ema.shape[0]} but the "
        f"stacked gradients have {gram.shape[0]} tasks on their leading "
        "axis"
      )
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    ema = norm_decay * state.norm_ema.astype(gram.dtype) + (1.0 - norm_decay) * norms
    w = gradcraft_weights(gram, tau=tau, eps=eps, norms=ema)
    return w, GradCraftState(norm_ema=ema.astype(state.norm_ema.dtype))

  return from_weighting(Weighting(init_fn, weights_fn, name="gradcraft", num_tasks=num_tasks))
