r"""GradDrop: gradient sign dropout, elementwise (not a weighting).

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign:
Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020
(arXiv:2010.06808), Algorithm 1; torchjd's ``GradDrop``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax import _cpu_gram
from gradcraft_jax._guards import check_task_count
from gradcraft_jax._stacked import finite_probe, kernel_pass, sum_over_tasks
from gradcraft_jax.methods._common import check_num_tasks
from gradcraft_jax.weighting import CoordinatewiseMethod

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

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> # column 0: all positive (P = 1 > U), column 1: all negative (P = 0 < U):
    >>> # every component is kept, whatever the draw
    >>> g = {"w": jnp.array([[1., -2.], [3., -4.]])}
    >>> graddrop_combine(g, jax.random.PRNGKey(0))["w"].tolist()
    [4.0, -6.0]

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020
  """
  return _combine_checked(stacked, key, leak, f)[0]


def _kernel_leaf(leaf: jax.Array, f) -> bool:
  """Whether a leaf takes the CPU kernel: :func:`kernel_pass` and the
  default ``f`` (the kernel computes the identity purity itself)."""
  return f is _identity and kernel_pass(leaf)


def _combine_xla(g, u, lk, f, acc):
  """Algorithm 1's combination of one ``(T, ...)`` leaf in XLA."""
  total = sum_over_tasks(g)
  mass = sum_over_tasks(jnp.abs(g))
  pos = mass > 0
  purity = 0.5 * (1.0 + jnp.where(pos, total / jnp.where(pos, mass, 1.0), 0.0))
  fp = f(purity)
  mask = ((fp > u)[None] & (g > 0)) | ((fp < u)[None] & (g < 0))
  keep = mask.astype(acc) if lk is None else lk + (1.0 - lk) * mask.astype(acc)
  return sum_over_tasks(keep * g)


def _combine_checked(stacked: Any, key: jax.Array, leak, f) -> tuple[Any, jax.Array]:
  """:func:`graddrop_combine` and whether every input element is finite.

  Large float32 leaves with the default ``f`` take the CPU kernel
  (``csrc/gram_cpu.cc``: the same float32 sums in the same order, one read
  of the leaf on every core, the finiteness check from the same pass);
  the others, and every leaf off CPU, the fused XLA chain."""
  leaves, treedef = jax.tree_util.tree_flatten(stacked)
  t = leaves[0].shape[0]
  out = []
  finite = jnp.array(True)
  for idx, leaf in enumerate(leaves):
    acc = jnp.result_type(jnp.float32, leaf.dtype)
    u = jax.random.uniform(jax.random.fold_in(key, idx), leaf.shape[1:], acc)
    if _kernel_leaf(leaf, f):
      flat = leaf.reshape(t, -1)
      leak_row = jnp.zeros((t,), acc) if leak is None else jnp.asarray(leak, acc)

      def fallback(x, v, lr):
        lr = None if leak is None else lr[:, None]
        return _combine_xla(x, v, lr, f, acc), finite_probe(x)

      combined, probe = jax.lax.platform_dependent(
        flat, u.reshape(-1), leak_row, cpu=_cpu_gram.graddrop, default=fallback
      )
      out.append(combined.reshape(leaf.shape[1:]))
      finite = finite & (probe[0] == 0.0)
    else:
      lk = None if leak is None else jnp.asarray(leak, acc).reshape((t,) + (1,) * (leaf.ndim - 1))
      out.append(_combine_xla(leaf.astype(acc), u, lk, f, acc).astype(leaf.dtype))
      finite = finite & jnp.all(jnp.isfinite(leaf))
  return jax.tree_util.tree_unflatten(treedef, out), finite


def graddrop(
  seed: int = 0,
  *,
  leak: jax.Array | None = None,
  f: Callable[[jax.Array], jax.Array] = _identity,
  num_tasks: int | None = None,
) -> CoordinatewiseMethod:
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

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = graddrop()
    >>> g = {"w": jnp.array([[1., 2.], [3., 4.]])}  # same signs: kept
    >>> upd, _ = tx.update(g, tx.init(None))
    >>> upd["w"]
    Array([4., 6.], dtype=float32)

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020
  """
  check_num_tasks(num_tasks, "graddrop")
  if not callable(f):
    raise TypeError(f"graddrop: f must be callable, got {f!r}")

  def init_fn(params):
    del params
    return GradDropState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    t = check_task_count(updates, "graddrop", num_tasks)
    if leak is not None and jnp.shape(jnp.asarray(leak)) != (t,):
      raise ValueError(f"graddrop: leak has shape {jnp.shape(jnp.asarray(leak))}, expected ({t},)")
    key, sub = jax.random.split(state.key)
    out, finite = _combine_checked(updates, sub, leak, f)
    out = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)
    # a non-finite input keeps the state (as the core does for weightings)
    return out, GradDropState(key=jnp.where(finite, key, state.key))

  return CoordinatewiseMethod(init_fn, update_fn)
