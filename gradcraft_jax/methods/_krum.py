r"""Krum and Multi-Krum: Byzantine-robust selection of gradients.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017; torchjd's
``Krum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcraft_jax.methods._common import check_num_tasks, empty_init, normalize_gram
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["krum", "krum_weights"]


def _check(t: int, n_byzantine: int, n_selected: int) -> None:
  if t < n_byzantine + 3:
    raise ValueError(
      f"krum: needs at least n_byzantine + 3 = {n_byzantine + 3} tasks, got {t} "
      "(each score sums the distances to the T - n_byzantine - 2 nearest others)"
    )
  if t < n_selected:
    raise ValueError(f"krum: n_selected={n_selected} exceeds the task count {t}")


def krum_weights(
  gram: jax.Array, *, n_byzantine: int = 0, n_selected: int = 1, squared: bool = False
) -> jax.Array:
  r"""(Multi-)Krum weights from the Gram matrix.

  Squared distances :math:`\|g_i - g_j\|^2 = K_{ii} + K_{jj} - 2K_{ij}`
  (clipped at 0); the score of ``i`` is the sum of its distances to its
  :math:`T - f - 2` nearest other gradients (``f = n_byzantine``); the
  ``n_selected`` gradients of lowest score get weight ``1 / n_selected``
  each, the others 0 (ties go to the lower index, as ``torch.topk``).

  As torchjd, the score sums distances (not squared distances, as in the
  paper's Krum): both are computed from ``K`` and the choice only changes
  which gradient wins in borderline cases; the paper's squared distances
  are used with ``squared=True``.

  Args:
    gram: ``(T, T)`` Gram matrix, ``T >= n_byzantine + 3``.
    n_byzantine: number ``f`` of gradients that may be adversarial (static).
    n_selected: number of gradients averaged (Multi-Krum; static).
    squared: score with squared distances (static).

  Returns:
    ``(T,)`` weights: ``1 / n_selected`` on the selected tasks.

  Examples:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1., 0.], [1.2, 0.], [0.9, 0.1], [-50., 3.]])
    >>> # scores (sums of the 2 nearest distances): 0.34, 0.52, 0.46, > 50
    >>> krum_weights(g @ g.T).tolist()
    [1.0, 0.0, 0.0, 0.0]
    >>> krum_weights(g @ g.T, n_selected=2).tolist()
    [0.5, 0.0, 0.5, 0.0]

  References:
    Blanchard et al., `Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent
    <https://proceedings.neurips.cc/paper/2017/file/f4b9ec30ad9f68f89b29639786cb62ef-Paper.pdf>`_,
    NeurIPS 2017
  """
  return _krum_weights(gram, n_byzantine, n_selected, squared=bool(squared))


def _krum_weights(gram, n_byzantine, n_selected, squared):
  t = gram.shape[0]
  _check(t, n_byzantine, n_selected)
  k = normalize_gram(gram)
  diag = jnp.diagonal(k)
  sq = jnp.clip(diag[:, None] + diag[None, :] - 2.0 * k, 0.0)
  dist = sq if squared else jnp.sqrt(sq)
  # The smallest T - f - 1 distances of each row include the zero distance
  # to itself (which sorts first among ties with index order irrelevant).
  n_closest = t - n_byzantine - 2
  nearest = -jax.lax.top_k(-dist, n_closest + 1)[0]
  scores = jnp.sum(nearest[:, 1:], axis=1)
  _, selected = jax.lax.top_k(-scores, n_selected)
  return jnp.sum(jax.nn.one_hot(selected, t, dtype=k.dtype), axis=0) / n_selected


def krum(
  n_byzantine: int = 0,
  n_selected: int = 1,
  *,
  squared: bool = False,
  num_tasks: int | None = None,
) -> Method:
  r"""Krum / Multi-Krum (Blanchard et al., NeurIPS 2017; torchjd's ``Krum``).

  A robust aggregator from Byzantine-tolerant distributed learning, offered
  by torchjd among its aggregators: among the ``T`` task gradients, select
  the ``n_selected`` ones whose ``T - n_byzantine - 2`` nearest neighbours
  are closest (sum of Euclidean distances), and average them. Distances
  come from the Gram matrix (:func:`krum_weights`), so Krum fits the
  Gram -> weights -> sum design exactly. Useful when some tasks' gradients
  may be corrupted outliers; with honest multi-task gradients it simply
  follows the most "central" task(s).

  Cost: the Gram matrix plus ``O(T^2 log T)`` sorting. Stateless,
  order-free (up to ties), 1-homogeneous in the gradients. Needs
  ``T >= n_byzantine + 3`` (``ValueError`` at ``update`` otherwise, also for
  ``T = 1``).

  Args:
    n_byzantine: number of possibly adversarial gradients ``f >= 0``
      (static Python int).
    n_selected: how many gradients to average (``1``: Krum; more:
      Multi-Krum; static).
    squared: score with squared distances (the paper's Krum) instead of
      distances (torchjd).
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An optax transformation over stacked per-task gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = krum(n_byzantine=1)
    >>> g = {"w": jnp.array([[1., 0.], [1.1, 0.], [0.9, 0.1], [-50., 3.]])}
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> [round(float(x), 4) for x in upd["w"]]  # the most central gradient
    [1.0, 0.0]

  References:
    Blanchard et al., `Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent
    <https://proceedings.neurips.cc/paper/2017/file/f4b9ec30ad9f68f89b29639786cb62ef-Paper.pdf>`_,
    NeurIPS 2017
  """
  for name, v, low in (("n_byzantine", n_byzantine, 0), ("n_selected", n_selected, 1)):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"krum: {name} must be an int >= {low}, got {v!r}")
  check_num_tasks(num_tasks, "krum")

  def weights_fn(gram, state, losses, **extra_args):
    del losses, extra_args
    return _krum_weights(gram, n_byzantine, n_selected, bool(squared)), state

  return from_weighting(Weighting(empty_init, weights_fn, name="krum", num_tasks=num_tasks))
