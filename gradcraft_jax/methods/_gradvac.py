r"""Gradient Vaccine (Wang, Tsvetkov, Firat and Cao, ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import (
  check_hyperparameter,
  check_int,
  check_num_tasks,
  normalize_gram,
  task_permutations,
)
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["gradvac", "gradvac_step", "GradVacState"]


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    phi: ``(T, T)`` EMA similarity targets :math:`\\hat\\phi_{ij}` (start at
      0; the diagonal is unused).
    key: ``uint32[2]`` PRNG key for the visiting orders.
  """

  phi: jax.Array
  key: jax.Array


def gradvac_step(
  gram: jax.Array, phi: jax.Array, perms: jax.Array, *, beta
) -> tuple[jax.Array, jax.Array]:
  r"""GradVac's update as weights on the raw gradients, and the new targets.

  For each task ``i`` (``vmap``): :math:`g_i' = g_i`; for each
  ``j = perms[i, k] != i`` in order, with
  :math:`\phi = \cos(g_i', g_j)` (0 when a norm is 0) and
  :math:`\hat\phi = \hat\phi_{ij}`:

  * if :math:`\phi < \hat\phi`:
    :math:`g_i' \mathrel{+}= \frac{\|g_i'\| (\hat\phi \sqrt{1-\phi^2} -
    \phi \sqrt{1-\hat\phi^2})}{\|g_j\| \sqrt{1-\hat\phi^2}} g_j`, which makes
    :math:`\cos(g_i', g_j) = \hat\phi` (skipped when :math:`\|g_j\| = 0`
    or :math:`\hat\phi = 1`, where no finite step reaches the target);
  * :math:`\hat\phi_{ij} \leftarrow (1-\beta) \hat\phi_{ij} + \beta \phi`
    (with the :math:`\phi` measured *before* the correction, as in the
    reference implementation and torchjd).

  :math:`g_i' = \sum_k C_{ik} g_k`; norms and cosines come from ``C`` and
  the (max-diagonal normalised) Gram matrix.

  Args:
    gram: ``(T, T)`` Gram matrix.
    phi: ``(T, T)`` current targets.
    perms: ``(T, T)`` visiting orders (row ``i`` a permutation of
      ``range(T)``; ``i`` itself is skipped).
    beta: EMA rate in ``[0, 1]``.

  Returns:
    ``(weights, new_phi)``: ``(T,)`` weights ``sum_i C_i`` (the update is
    the **sum** of the corrected gradients) and the ``(T, T)`` new targets.

  Examples:
    >>> import jax.numpy as jnp
    >>> # g_1 = (1, 0), g_2 = (-1, 1), targets 0 (PCGrad): g_1' = g_1 + g_2 / 2,
    >>> # g_2' = g_2 + g_1, so the sum is 2 g_1 + 1.5 g_2
    >>> k = jnp.array([[1., -1.], [-1., 2.]])
    >>> perms = jnp.array([[0, 1], [0, 1]])
    >>> w, phi = gradvac_step(k, jnp.zeros((2, 2)), perms, beta=0.5)
    >>> [round(float(x), 4) for x in w]
    [2.0, 1.5]
    >>> round(float(phi[0, 1]), 4)  # 0.5 * 0 + 0.5 * cos = -0.5 / sqrt(2)
    -0.3536

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models <https://openreview.net/forum?id=F1vEjWK-lH_>`_, ICLR 2021
  """
  k = normalize_gram(gram)
  t = k.shape[0]
  dtype = k.dtype
  phi = phi.astype(dtype)
  beta = jnp.asarray(beta, dtype)
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(k), 0.0))

  def one_row(i, perm, phi_i):
    c0 = jax.nn.one_hot(i, t, dtype=dtype)

    def body(pos, carry):
      c, phi_row = carry
      j = perm[pos]
      cg = k @ c  # <g_i', g_m> for every m
      ni = jnp.sqrt(jnp.clip(c @ cg, 0.0))
      nj = norms[j]
      den = ni * nj
      cos = jnp.where(den > 0, cg[j] / jnp.where(den > 0, den, 1.0), 0.0)
      cos = jnp.clip(cos, -1.0, 1.0)
      hat = phi_row[j]
      sin = jnp.sqrt(jnp.clip(1.0 - cos * cos, 0.0))
      hat_sin = jnp.sqrt(jnp.clip(1.0 - hat * hat, 0.0))
      den_w = nj * hat_sin
      other = j != i
      active = other & (cos < hat) & (den_w > 0)
      w = ni * (hat * sin - cos * hat_sin) / jnp.where(den_w > 0, den_w, 1.0)
      c = c.at[j].add(jnp.where(active, w, 0.0))
      new_hat = jnp.where(other, (1.0 - beta) * hat + beta * cos, hat)
      return c, phi_row.at[j].set(new_hat)

    return jax.lax.fori_loop(0, t, body, (c0, phi_i))

  coef, new_phi = jax.vmap(one_row)(jnp.arange(t), perms, phi)
  return jnp.sum(coef, axis=0), new_phi


def gradvac(beta: float = 0.5, seed: int = 0, *, num_tasks: int) -> Method:
  r"""Gradient Vaccine over stacked per-task gradients.

  Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving
  Multi-task Optimization in Massively Multilingual Models", ICLR 2021
  (arXiv:2010.05874). PCGrad generalised to a positive similarity target:
  each task gradient is corrected towards the adaptive target
  :math:`\hat\phi_{ij}` (an EMA of the observed cosine similarities, kept in
  the state) whenever its cosine with another task's gradient falls below
  it; see :func:`gradvac_step` for the exact rule. The update is the
  **sum** of the corrected gradients (paper, LibMTL and torchjd's
  ``GradVac``).

  Visiting order: random per task and per update, as in the paper and
  torchjd (the PRNG key lives in the state; see :func:`pcgrad`).
  Granularity: whole model only (one similarity per task pair over all
  parameters, torchjd's default); per-layer variants can be obtained by
  applying the transform to parameter subsets with ``optax.partition``.

  Args:
    beta: EMA rate of the targets in ``[0, 1]`` (injectable).
    seed: integer seed of the visiting orders.
    num_tasks: the task count ``T`` (the state holds ``T x T`` targets).

  Returns:
    An optax transformation over stacked gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = gradvac(num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([[1., 0.], [-1., 1.]])}
    >>> upd, state = tx.update(g, state)  # targets 0: PCGrad's first step
    >>> upd["w"]
    Array([0.5, 1.5], dtype=float32)

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models <https://openreview.net/forum?id=F1vEjWK-lH_>`_, ICLR 2021
  """
  check_hyperparameter("beta", beta, low=0.0, high=1.0, method="gradvac")
  check_int("seed", seed, method="gradvac", allow_array=True)
  check_num_tasks(num_tasks, "gradvac", required=True)

  def init_fn(params):
    return GradVacState(
      phi=jnp.zeros((num_tasks, num_tasks), accumulation_dtype(params)),
      key=jax.random.PRNGKey(seed),
    )

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    key, perms = task_permutations(state.key, gram.shape[0])
    w, phi = gradvac_step(gram, state.phi, perms, beta=beta)
    return w, GradVacState(phi=phi.astype(state.phi.dtype), key=key)

  return from_weighting(Weighting(init_fn, weights_fn, name="gradvac", num_tasks=num_tasks))
