r"""GradDrop: gradient sign dropout, elementwise (not a weighting).

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign:
Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020
(arXiv:2010.06808), Algorithm 1; torchjd's ``GradDrop``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import sum_over_tasks
from gradcraft_jax.methods._common import check_num_tasks
from gradcraft_jax.methods._trimmed_mean import _all_finite, _check_tasks, _refuse_query

__all__ = ["graddrop", "graddrop_combine", "GradDropState"]


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    key: ``uint32[2]`` PRNG key, split at every update to draw the uniform
      thresholds.
  """

  key: jax.Array


def _identity(p):
  return p


def graddrop_combine(
  stacked: Any,
  key: jax.Array,
  *,
  leak: jax.Array | None = None,
  f: Callable[[jax.Array], jax.Array] = _identity,
) -> Any:
  r"""GradDrop's combination of stacked gradients (Algorithm 1, lines 10-15).

  Per coordinate, the positive sign purity
  :math:`P = \frac12 (1 + \sum_i g_i / \sum_i |g_i|) \in [0, 1]` (``1/2``
  where every task is zero), one threshold :math:`U \sim \mathcal U(0, 1)`,
  and the masks

  .. math:: M_i = [f(P) > U]\,[g_i > 0] + [f(P) < U]\,[g_i < 0]:

  with probability :math:`f(P)` only the positive components survive, else
  only the negative ones. The result is
  :math:`\sum_i (\ell_i + (1 - \ell_i) M_i)\, g_i` with leaks
  :math:`\ell_i` (default 0).

  Args:
    stacked: stacked per-task gradients (leading axis ``T``).
    key: PRNG key; leaf ``k`` uses ``jax.random.fold_in(key, k)``.
    leak: optional ``(T,)`` leak values in ``[0, 1]``.
    f: monotonically increasing map of ``[0, 1]`` to itself (default
      identity), applied to ``P`` elementwise.

  Returns:
    A pytree like the parameters, in the input dtypes (computed in at least
    float32).
  """
  leaves, treedef = jax.tree_util.tree_flatten(stacked)
  t = leaves[0].shape[0]
  out = []
  for idx, leaf in enumerate(leaves):
    acc = jnp.result_type(jnp.float32, leaf.dtype)
    g = leaf.astype(acc)
    total = sum_over_tasks(g)
    mass = sum_over_tasks(jnp.abs(g))
    pos = mass > 0
    purity = 0.5 * (1.0 + jnp.where(pos, total / jnp.where(pos, mass, 1.0), 0.0))
    fp = f(purity)
    u = jax.random.uniform(jax.random.fold_in(key, idx), total.shape, acc)
    mask = ((fp > u)[None] & (g > 0)) | ((fp < u)[None] & (g < 0))
    if leak is None:
      keep = mask.astype(acc)
    else:
      lk = jnp.asarray(leak, acc).reshape((t,) + (1,) * (g.ndim - 1))
      keep = lk + (1.0 - lk) * mask.astype(acc)
    out.append(sum_over_tasks(keep * g).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def graddrop(
  seed: int = 0,
  *,
  leak: jax.Array | None = None,
  f: Callable[[jax.Array], jax.Array] = _identity,
  num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GradDrop (Chen et al., NeurIPS 2020, arXiv:2010.06808).

  Gradient sign dropout: for every parameter coordinate, keep either only
  the tasks' positive components or only their negative ones, choosing
  "positive" with probability equal to the coordinate's positive sign
  purity (see :func:`graddrop_combine`); the update is the **sum** of the
  kept components (the paper and torchjd).

  **Not a weighting.** The decision is per coordinate and by sign, so the
  update is not :math:`\sum_i w_i g_i` for task weights ``w`` and not a
  function of the Gram matrix: this transform works directly on the
  stacked gradients (elementwise, one pass, no Gram matrix), outside the
  library's Gram -> weights -> sum core, and
  :func:`~gradcraft_jax.task_weights`, the lean one-backward-pass step and
  representation-level gradients do not apply to it (``TypeError``). The
  paper applies GradDrop to the gradients at a chosen activation layer
  summed over the batch (its "GradDrop layer"); like torchjd this applies
  it to the per-task gradients of the parameters passed to it (use
  ``optax.partition`` or ``optax.masked`` to restrict it to some leaves).

  Randomness: the state holds a PRNG key (from ``seed``), split at every
  update (kept when the input is not finite: the update is then NaN);
  one uniform threshold per coordinate. Order-free (permuting the
  tasks permutes nothing in the update, for a fixed key), 1-homogeneous in
  the gradients, no conflict guarantee. Cost: one elementwise pass over
  the stacked gradients plus one random number per coordinate.

  Args:
    seed: integer seed of the thresholds.
    leak: optional ``(T,)`` leak values in ``[0, 1]``: task ``i``'s
      gradient passes with weight at least ``leak_i`` (injectable array).
    f: monotonically increasing function of the purity (static callable),
      default identity.
    num_tasks: optional task count; a mismatch raises at ``update``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over stacked per-task
    gradients; extra arguments are accepted and ignored.

  >>> import jax.numpy as jnp
  >>> tx = graddrop()
  >>> g = {"w": jnp.array([[1., 2.], [3., 4.]])}  # same signs: kept
  >>> upd, _ = tx.update(g, tx.init(None))
  >>> upd["w"]
  Array([4., 6.], dtype=float32)
  """
  check_num_tasks(num_tasks, "graddrop")
  if not callable(f):
    raise TypeError(f"graddrop: f must be callable, got {f!r}")

  def init_fn(params):
    del params
    return GradDropState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _refuse_query(updates, "graddrop")
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    t = _check_tasks(updates, "graddrop", num_tasks)
    if leak is not None and jnp.shape(leak) != (t,):
      raise ValueError(f"graddrop: leak has shape {jnp.shape(leak)}, expected ({t},)")
    key, sub = jax.random.split(state.key)
    out = graddrop_combine(updates, sub, leak=leak, f=f)
    finite = _all_finite(updates)
    out = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)
    # a non-finite input keeps the state (as the core does for weightings)
    return out, GradDropState(key=jnp.where(finite, key, state.key))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
