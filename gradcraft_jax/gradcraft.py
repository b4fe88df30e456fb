r"""GradCraft: magnitude alignment and global direction deconfliction.

Bai et al., "GradCraft: Elevating Multi-task Recommendations through Holistic
Gradient Crafting", KDD 2024 (arXiv:2407.19682).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax.weighting import (check_hyperparameter, empty_init,
                                     from_weighting, pinv_psd)

__all__ = ["gradcraft", "gradcraft_weights", "GradCraftState"]


class GradCraftState(NamedTuple):
  """State of :func:`gradcraft` with ``norm_decay > 0``.

  Attributes:
    norm_ema: ``(T,)`` exponential moving average of the task-gradient norms,
      ``n <- b * n + (1 - b) * ||g||``, starting from zero.
  """
  norm_ema: jax.Array


def _safe_scale(norms: jax.Array, tau) -> jax.Array:
  """Magnitude factors ``s_i = tau * max_j n_j / n_i + 1 - tau``.

  A task with ``n_i = 0`` gets ``s_i = 1`` (its gradient is zero in the
  paper's setting, so any finite factor leaves it zero).
  """
  top = jnp.max(norms)
  pos = norms > 0
  ratio = jnp.where(pos, top / jnp.where(pos, norms, 1.0), 0.0)
  return jnp.where(pos, tau * ratio + (1.0 - tau), 1.0)


def gradcraft_weights(gram: jax.Array, *, tau, eps,
                      norms: jax.Array | None = None) -> jax.Array:
  r"""GradCraft's update as task weights on the raw gradients.

  With magnitude factors :math:`s_i = \tau \max_j n_j / n_i + 1 - \tau`
  (:math:`n_i = \|g_i\|`, or the averaged norms when given), the adjusted
  gradients are :math:`\hat g_i = s_i g_i` and their Gram matrix is
  :math:`H = S K S`. Task ``i`` conflicts with the set
  :math:`C_i = \{k : H_{ik} < 0\}`. The deconflicted gradient is
  :math:`\tilde g_i = \hat g_i + \sum_{k \in C_i} W_{ik} \hat g_k` where
  :math:`W_{i,C_i}` is the minimum-norm solution of

  .. math:: H_{C_i C_i} w = -H_{C_i i} + \epsilon \|\hat g_i\|
     \|\hat g_{C_i}\|,

  i.e. :math:`\langle \tilde g_i, \hat g_k \rangle = \epsilon \|\hat g_i\|
  \|\hat g_k\|` for every :math:`k \in C_i`. All ``T`` masked systems are
  solved at once with ``vmap`` at the fixed shape ``(T, T)`` (rows and
  columns outside :math:`C_i` are zeroed and the pseudo-inverse maps them to
  zero). The update :math:`\frac1T \sum_i \tilde g_i` equals
  :math:`\sum_k c_k g_k` with

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
  """
  t = gram.shape[0]
  dtype = gram.dtype
  # The weights are invariant to a global scale of K: normalise so that the
  # solve works for gradients from 1e-12 to 1e12 alike.
  diag = jnp.clip(jnp.diagonal(gram), 0.0)
  top = jnp.max(diag)
  scale = jnp.where(top > 0, top, 1.0)
  k = gram / scale
  raw_norms = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))
  if norms is None:
    n = raw_norms
  else:
    n = jnp.asarray(norms, dtype)
  s = _safe_scale(n, jnp.asarray(tau, dtype))
  h = s[:, None] * k * s[None, :]
  hat_norms = s * raw_norms
  conflict = h < 0  # (T, T); the diagonal is never negative
  eps = jnp.asarray(eps, dtype)

  def solve_one(mask_i, h_col_i, hat_norm_i):
    m = mask_i.astype(dtype)
    a = m[:, None] * h * m[None, :]
    rhs = m * (-h_col_i + eps * hat_norm_i * hat_norms)
    return pinv_psd(a) @ rhs

  w = jax.vmap(solve_one)(conflict, h, hat_norms)  # w[i, k]
  return s * (1.0 + jnp.sum(w, axis=0)) / t


def gradcraft(tau: float = 0.5, eps: float = 0.0, norm_decay: float = 0.0, *,
              num_tasks: int | None = None
              ) -> optax.GradientTransformationExtraArgs:
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
      state holds ``T`` averaged norms), optional otherwise.

  Returns:
    An optax transformation: ``update(stacked_grads, state, params=None)``
    maps a pytree whose leaves have shape ``(T, ...)`` to one like the
    parameters (same dtypes).

  >>> import jax.numpy as jnp, optax
  >>> tx = optax.chain(gradcraft(tau=0.5, eps=0.1), optax.sgd(1.0))
  >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
  >>> upd, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> upd["w"].shape
  (2,)
  """
  check_hyperparameter("tau", tau, low=0.0, high=1.0, method="gradcraft")
  check_hyperparameter("eps", eps, low=0.0, method="gradcraft")
  check_hyperparameter("norm_decay", norm_decay, low=0.0, high=1.0,
                       high_open=True, method="gradcraft")
  if not isinstance(norm_decay, (int, float)):
    raise ValueError("gradcraft: norm_decay must be a Python float (it "
                     "decides the state's structure)")
  if num_tasks is not None and (not isinstance(num_tasks, int)
                                or num_tasks < 1):
    raise ValueError(f"gradcraft: num_tasks must be a positive int, got "
                     f"{num_tasks!r}")

  if norm_decay == 0.0:
    def weights_fn(gram, state, losses, extra_args):
      del losses, extra_args
      return gradcraft_weights(gram, tau=tau, eps=eps), state

    return from_weighting(empty_init, weights_fn, name="gradcraft",
                          expected_tasks=num_tasks)

  if num_tasks is None:
    raise ValueError("gradcraft: norm_decay > 0 keeps T averaged norms in "
                     "the state; pass num_tasks=T")

  def init_fn(params):
    dtype = jnp.result_type(jnp.float32, *[
        jnp.result_type(x) for x in jax.tree_util.tree_leaves(params)])
    return GradCraftState(norm_ema=jnp.zeros((num_tasks,), dtype))

  def ema_weights_fn(gram, state, losses, extra_args):
    del losses, extra_args
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    ema = (norm_decay * state.norm_ema.astype(gram.dtype)
           + (1.0 - norm_decay) * norms)
    w = gradcraft_weights(gram, tau=tau, eps=eps, norms=ema)
    return w, GradCraftState(norm_ema=ema.astype(state.norm_ema.dtype))

  return from_weighting(init_fn, ema_weights_fn, name="gradcraft",
                        expected_tasks=num_tasks)
