r"""PCGrad (Yu et al., NeurIPS 2020) and the GradCraft paper's PCGrad+."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_int,
  check_num_tasks,
  magnitude_scale,
  normalize_gram,
  task_permutations,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = [
  "pcgrad",
  "pcgrad_weights",
  "pcgrad_plus",
  "pcgrad_plus_weights",
  "PCGradState",
  "sequential_projection",
]


class PCGradState(NamedTuple):
  """State of :func:`pcgrad` and :func:`pcgrad_plus`.

  Attributes:
    key: ``uint32[2]`` PRNG key, split at every update to draw the orders.
  """

  key: jax.Array


def sequential_projection(
  gram: jax.Array, perms: jax.Array, target: jax.Array | None = None
) -> jax.Array:
  r"""Coefficients of PCGrad-style sequential projections, in Gram space.

  For every task ``i`` (``vmap``), start from :math:`v = g_i` and visit
  ``j = perms[i, 0], perms[i, 1], ...`` (``j == i`` is skipped); whenever
  :math:`\langle v, g_j \rangle < 0` and :math:`g_j \ne 0`, set

  .. math:: v \leftarrow v + \frac{t_{ij} - \langle v, g_j\rangle}
     {\|g_j\|^2} g_j,

  after which :math:`\langle v, g_j \rangle = t_{ij}` (``target``, zero by
  default: the orthogonal projection of PCGrad). Tests and projections use
  the *original* :math:`g_j`. Since every step adds a multiple of some
  :math:`g_j`, :math:`v = \sum_k C_{ik} g_k`; only ``C`` is tracked
  (``lax.fori_loop`` over the ``T`` positions, ``O(T^2)`` per task).

  Args:
    gram: ``(T, T)`` Gram matrix of the gradients being projected.
    perms: ``(T, T)`` int array, row ``i`` the visiting order of task ``i``
      (a permutation of ``range(T)``).
    target: optional ``(T, T)`` targets :math:`t_{ij}`.

  Returns:
    ``(T, T)`` coefficients ``C`` with row ``i`` giving the projected
    :math:`g_i`.
  """
  t = gram.shape[0]
  dtype = gram.dtype
  diag = jnp.diagonal(gram)
  if target is None:
    target = jnp.zeros_like(gram)

  def one_row(i, perm, target_i):
    c0 = jax.nn.one_hot(i, t, dtype=dtype)

    def body(pos, c):
      j = perm[pos]
      inner = gram[j] @ c
      kjj = diag[j]
      active = (j != i) & (inner < 0) & (kjj > 0)
      step = (target_i[j] - inner) / jnp.where(kjj > 0, kjj, 1.0)
      return c.at[j].add(jnp.where(active, step, 0.0))

    return jax.lax.fori_loop(0, t, body, c0)

  return jax.vmap(one_row)(jnp.arange(t), perms, target)


def pcgrad_weights(gram: jax.Array, perms: jax.Array) -> jax.Array:
  r"""PCGrad's update :math:`\sum_i g_i^{PC}` as weights on the raw gradients.

  Args:
    gram: ``(T, T)`` Gram matrix.
    perms: ``(T, T)`` visiting orders (see :func:`sequential_projection`).

  Returns:
    ``(T,)`` weights ``w`` with :math:`\sum_i g_i^{PC} = \sum_k w_k g_k`.

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (-1, 1): g_1^PC = g_1 + g_2 / 2, g_2^PC = g_2 + g_1
    >>> w = pcgrad_weights(jnp.array([[1., -1.], [-1., 2.]]), jnp.array([[0, 1], [0, 1]]))
    >>> [round(float(x), 4) for x in w]
    [2.0, 1.5]

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_,
    NeurIPS 2020
  """
  return jnp.sum(sequential_projection(normalize_gram(gram), perms), axis=0)


def pcgrad_plus_weights(gram: jax.Array, perms: jax.Array, *, tau, eps) -> jax.Array:
  r"""PCGrad+ as weights on the raw gradients (see :func:`pcgrad_plus`).

  Args:
    gram: ``(T, T)`` Gram matrix ``K`` of the raw gradients.
    perms: ``(T, T)`` visiting orders.
    tau: magnitude-alignment strength in ``[0, 1]``.
    eps: similarity target ``>= 0``.

  Returns:
    ``(T,)`` weights ``c`` with update ``sum_k c_k g_k``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # tau = 0, eps = 0: PCGrad's projections, averaged instead of summed
    >>> k = jnp.array([[1., -1.], [-1., 2.]])
    >>> w = pcgrad_plus_weights(k, jnp.array([[0, 1], [0, 1]]), tau=0.0, eps=0.0)
    >>> [round(float(x), 4) for x in w]
    [1.0, 0.75]

  References:
    Bai et al., `GradCraft: Elevating Multi-task Recommendations through Holistic Gradient Crafting
    <https://arxiv.org/abs/2407.19682>`_, KDD 2024

    Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_,
    NeurIPS 2020
  """
  t = gram.shape[0]
  k = normalize_gram(gram)
  dtype = k.dtype
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))
  s = magnitude_scale(norms, jnp.asarray(tau, dtype))
  h = s[:, None] * k * s[None, :]
  hat_norms = s * norms
  target = jnp.asarray(eps, dtype) * hat_norms[:, None] * hat_norms[None, :]
  coef = sequential_projection(h, perms, target)  # on the adjusted ĝ
  return s * jnp.sum(coef, axis=0) / t


def _random_order_transform(name, weights_of, seed, num_tasks):
  def init_fn(params):
    del params
    return PCGradState(key=jax.random.PRNGKey(seed))

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    key, perms = task_permutations(state.key, gram.shape[0])
    return weights_of(gram, perms), PCGradState(key=key)

  return from_weighting(Weighting(init_fn, weights_fn, name=name, num_tasks=num_tasks))


def pcgrad(seed: int = 0, *, num_tasks: int | None = None) -> Method:
  r"""PCGrad ("gradient surgery") over stacked per-task gradients.

  Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
  Learning", NeurIPS 2020 (arXiv:2001.06782), Algorithm 1: for each task
  ``i``, :math:`g_i^{PC} = g_i`, then for each other task ``j`` in a random
  order, if :math:`\langle g_i^{PC}, g_j \rangle < 0`:

  .. math:: g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j
     \rangle}{\|g_j\|^2} g_j

  (projections against the *original* gradients). The update is the
  **sum** :math:`\sum_i g_i^{PC}` (the paper, LibMTL and torchjd's
  ``PCGrad``; divide the learning rate by ``T`` for the mean). Computed in
  Gram space (:func:`sequential_projection`).

  Randomness: the state holds a PRNG key (from ``seed``); each update splits
  it and draws one independent permutation per task (``vmap`` of
  ``jax.random.permutation``), so runs are reproducible and jit-friendly.

  Args:
    seed: integer seed of the visiting orders.
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = pcgrad()
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> upd["w"]  # (1, 0) + (1, 1)/2 + (0, 1)
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_,
    NeurIPS 2020
  """
  check_int("seed", seed, method="pcgrad", allow_array=True)
  check_num_tasks(num_tasks, "pcgrad")
  return _random_order_transform("pcgrad", pcgrad_weights, seed, num_tasks)


def pcgrad_plus(
  tau: float = 0.5, eps: float = 0.0, seed: int = 0, *, num_tasks: int | None = None
) -> Method:
  r"""PCGrad+: GradCraft's magnitude alignment, then PCGrad-style projections.

  The "PCGrad+" ablation of Bai et al., "GradCraft: Elevating Multi-task
  Recommendations through Holistic Gradient Crafting", KDD 2024
  (arXiv:2407.19682): GradCraft with its global (all-at-once) deconfliction
  replaced by PCGrad's sequential pairwise projections. Exact rule:

  1. :math:`\hat g_i = s_i g_i`, :math:`s_i = \tau \max_j \|g_j\| /
     \|g_i\| + 1 - \tau` (GradCraft's step 1, same code).
  2. For each task ``i``: :math:`g_i' = \hat g_i`; for each ``j != i`` in a
     random order, if :math:`\langle g_i', \hat g_j \rangle < 0` (the
     conflict test of GradCraft),

     .. math:: g_i' \leftarrow g_i' + \frac{\epsilon \|\hat g_i\|
        \|\hat g_j\| - \langle g_i', \hat g_j \rangle}{\|\hat g_j\|^2}
        \hat g_j,

     so that afterwards :math:`\langle g_i', \hat g_j \rangle = \epsilon
     \|\hat g_i\| \|\hat g_j\|` (GradCraft's target, with the norm of the
     *adjusted, unprojected* :math:`\hat g_i`). ``eps = 0`` is PCGrad on the
     magnitude-aligned gradients.
  3. The update is the **mean** :math:`\frac1T \sum_i g_i'`, like
     GradCraft (not the sum of :func:`pcgrad`).

  Args:
    tau: magnitude-alignment strength in ``[0, 1]`` (injectable).
    eps: similarity target ``>= 0`` (injectable).
    seed: integer seed of the visiting orders (as in :func:`pcgrad`).
    num_tasks: optional task count ``T``, checked at each update.

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = pcgrad_plus(tau=0.0, eps=0.0)
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> upd["w"]  # pcgrad / 2
    Array([0.25, 0.75], dtype=float32)

  References:
    Bai et al., `GradCraft: Elevating Multi-task Recommendations through Holistic Gradient Crafting
    <https://arxiv.org/abs/2407.19682>`_, KDD 2024

    Yu et al., `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_,
    NeurIPS 2020
  """
  check_hyperparameter("tau", tau, low=0.0, high=1.0, method="pcgrad_plus")
  check_hyperparameter("eps", eps, low=0.0, method="pcgrad_plus")
  check_int("seed", seed, method="pcgrad_plus", allow_array=True)
  check_num_tasks(num_tasks, "pcgrad_plus")

  def weights_of(gram, perms):
    return pcgrad_plus_weights(gram, perms, tau=tau, eps=eps)

  return _random_order_transform("pcgrad_plus", weights_of, seed, num_tasks)
