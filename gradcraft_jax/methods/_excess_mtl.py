r"""ExcessMTL: task weights from estimated excess risks.

He, Zhou, Ouyang, Zhao, "Robust Multi-Task Learning with Excess Risks",
ICML 2024 (arXiv:2402.02009); the official code
(github.com/uiuctml/ExcessMTL), LibMTL's and torchjd's ``ExcessMTL``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax import _cpu_gram
from gradcraft_jax._guards import check_task_count
from gradcraft_jax._stacked import (
  accumulation_dtype,
  finite_probe,
  kernel_pass,
  same_treedef,
  weighted_sum,
)
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import CoordinatewiseMethod

__all__ = ["excess_mtl", "excess_mtl_weights", "ExcessMTLState"]


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl` (``T`` copies of the parameters' size).

  Attributes:
    sq_sum: stacked pytree (leaves ``(T, *param.shape)``, float32 at
      least): the running sums :math:`S_i` of the squared gradients.
    weights: ``(T,)`` task weights on the simplex (``1/T`` at the start).
    base: ``(T,)`` the baseline excess risks (set after the warm-up).
    warmup_sum: ``(T,)`` the sum of the excess risks seen during warm-up.
    count: int32 number of updates so far.
  """

  sq_sum: Any
  weights: jax.Array
  base: jax.Array
  warmup_sum: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count


def excess_mtl_weights(
  excess: jax.Array,
  weights: jax.Array,
  base: jax.Array,
  *,
  robust_step_size=1.0,
  use_base: bool | jax.Array = True,
) -> jax.Array:
  r"""One exponentiated-gradient step (Equation 9 of He et al.):
  :math:`w \leftarrow \mathrm{softmax}(\log w + \eta\, \hat E / b)` with
  excess risks :math:`\hat E` and baselines ``b`` (``b = 1`` when
  ``use_base`` is false: the first step without warm-up, as the official
  code).

  Args:
    excess: ``(T,)`` excess risk estimates :math:`\hat E_i`.
    weights: ``(T,)`` current weights on the simplex.
    base: ``(T,)`` baselines.
    robust_step_size: :math:`\eta > 0`.
    use_base: whether to divide by ``base + 1e-7``.

  Returns:
    ``(T,)`` new weights.

  Examples:
    >>> import jax.numpy as jnp
    >>> # softmax(log(1/2, 1/2) + (1, 0)) = (e, 1) / (e + 1)
    >>> w = excess_mtl_weights(jnp.array([1., 0.]), jnp.array([0.5, 0.5]), jnp.ones(2),
    ...                        use_base=False)
    >>> [round(float(x), 4) for x in w]
    [0.7311, 0.2689]

  References:
    He et al., `Robust Multi-Task Learning with Excess Risks
    <https://openreview.net/forum?id=JzWFmMySpn>`_, ICML 2024
  """
  scaled = jnp.where(use_base, excess / (base + 1e-7), excess)
  return jax.nn.softmax(jnp.log(weights) + robust_step_size * scaled)


def _excess_xla(g, s, acc):
  """``S + G**2`` and the excess risks of one ``(T, ...)`` leaf in XLA."""
  sn = s + jnp.square(g.astype(s.dtype))
  term = jnp.square(g.astype(acc)) / jnp.sqrt(sn.astype(acc) + 1e-7)
  return sn, jnp.sum(term.reshape(g.shape[0], -1), axis=1)


def _excess_pass(updates, sq_sum, t, acc):
  r"""``S + G**2``, the excess risks :math:`\hat E` and whether ``G`` is
  finite, leaf by leaf; large float32 leaves take the CPU kernel (one read
  of ``G`` and ``S`` and one write of the new ``S`` on every core, the
  finiteness check from the same pass), the others XLA. Also returns which
  leaves took the kernel."""
  new_leaves, on_kernel = [], []
  excess = jnp.zeros((t,), acc)
  finite = jnp.array(True)
  treedef = jax.tree_util.tree_structure(sq_sum)
  for s, g in zip(jax.tree_util.tree_leaves(sq_sum), jax.tree_util.tree_leaves(updates)):
    if kernel_pass(g, s):

      def fallback(gf, sf):
        return (*_excess_xla(gf, sf, jnp.float32), finite_probe(gf))

      sn, e, probe = jax.lax.platform_dependent(
        g.reshape(t, -1), s.reshape(t, -1), cpu=_cpu_gram.excess_pass, default=fallback
      )
      new_leaves.append(sn.reshape(s.shape))
      excess = excess + e.astype(acc)
      finite = finite & (probe[0] == 0.0)
      on_kernel.append(True)
      continue
    sn, e = _excess_xla(g, s, acc)
    excess = excess + e
    finite = finite & jnp.all(jnp.isfinite(g))
    new_leaves.append(sn)
    on_kernel.append(False)
  return jax.tree_util.tree_unflatten(treedef, new_leaves), excess, finite, on_kernel


def _keep_if(keep, new, old):
  """``new`` if ``keep`` else ``old``: in place on CPU (the kernel's leaves)."""
  return jax.lax.platform_dependent(
    keep, new, old, cpu=_cpu_gram.keep_if, default=lambda k, a, b: jnp.where(k, a, b)
  )


def excess_mtl(
  robust_step_size: float = 1.0, warmup_steps: int = 0, *, num_tasks: int
) -> CoordinatewiseMethod:
  r"""ExcessMTL (He et al., ICML 2024, arXiv:2402.02009).

  Weights tasks by their estimated *excess* risk (distance to their own
  optimum) rather than their loss, so that tasks with large irreducible
  noise do not dominate. Per update, with per-coordinate running sums of
  squared gradients :math:`S_i \mathrel{+}= g_i^2` (an AdaGrad-style
  diagonal Hessian estimate, Equation 7),

  .. math:: \hat E_i = \sum_k \frac{g_{ik}^2}{\sqrt{S_{ik} + 10^{-7}}}
     \quad(\approx g_i^\top H_i^{-1} g_i,\ \text{Equation 6}),

  the weights take an exponentiated-gradient step on the simplex
  (:func:`excess_mtl_weights`, with :math:`\hat E_i` divided by its
  baseline after the first step, Section 3.2), and the update is
  :math:`\sum_i w_i g_i`. During the first ``warmup_steps`` updates the
  weights stay at ``1/T`` and the baseline is the mean excess risk seen
  (Appendix C.1); with ``0`` (default) the first update's excess risk is
  the baseline and is used raw once, as in the official code, LibMTL and
  torchjd. As torchjd (and the paper), the weights start at ``1/T``
  (the official code and LibMTL start at 1).

  **Memory: the state holds** ``T`` **copies of the parameters** (the sums
  :math:`S_i`, in float32 at least). The weights depend on the gradients
  coordinate by coordinate through :math:`S`, not through the Gram matrix,
  so this is its own transform (the final combination is the library's
  ``weighted_sum``), and :func:`~gradcraft_jax.task_weights`, the lean
  step and representation-level gradients do not apply to it.

  Cost per update: one elementwise pass over ``G`` and ``S`` plus one
  weighted sum. Order-free. Scale: :math:`\hat E` is 1-homogeneous in the
  gradients (for gradients well above :math:`10^{-7/2}`), and after the
  first step only its ratio to the baseline matters. No conflict
  guarantee. A non-finite input gives a NaN update and leaves the state
  unchanged.

  Args:
    robust_step_size: :math:`\eta > 0` (injectable).
    warmup_steps: updates with uniform weights collecting the baseline
      (static Python int ``>= 0``).
    num_tasks: the task count ``T`` (required).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over stacked per-task
    gradients whose ``init`` needs the parameters.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = excess_mtl(num_tasks=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([[1., 0.], [0., 0.]])}
    >>> upd, state = tx.update(g, state)
    >>> [round(float(x), 4) for x in state.weights]  # softmax(log(1/2) + (1, 0))
    [0.7311, 0.2689]

  References:
    He et al., `Robust Multi-Task Learning with Excess Risks
    <https://openreview.net/forum?id=JzWFmMySpn>`_, ICML 2024
  """
  check_hyperparameter(
    "robust_step_size", robust_step_size, low=0.0, low_open=True, method="excess_mtl"
  )
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"excess_mtl: warmup_steps must be an int >= 0, got {warmup_steps!r}")
  check_num_tasks(num_tasks, "excess_mtl", required=True)
  t0 = int(num_tasks)
  warm = warmup_steps

  def init_fn(params):
    if params is None or not jax.tree_util.tree_leaves(params):
      sq = params
    else:
      sq = jax.tree_util.tree_map(
        lambda p: jnp.zeros((t0,) + jnp.shape(p), jnp.result_type(jnp.float32, p)), params
      )
    zeros = jnp.zeros((t0,), jnp.float32)
    return ExcessMTLState(
      sq_sum=sq,
      weights=jnp.full((t0,), 1.0 / t0, jnp.float32),
      base=zeros,
      warmup_sum=jnp.zeros((t0,), jnp.float32),  # its own buffer (donation)
      count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    check_task_count(updates, "excess_mtl", t0)
    if not same_treedef(
      jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(state.sq_sum)
    ):
      raise ValueError(
        "excess_mtl: the stacked gradients do not have the structure of the parameters "
        "given to init"
      )
    acc = accumulation_dtype(updates)
    sq_sum, excess, finite, kernel_leaves = _excess_pass(updates, state.sq_sum, t0, acc)
    excess = excess.astype(jnp.float32)
    count = state.count
    in_warmup = count < warm
    warmup_sum = jnp.where(in_warmup, state.warmup_sum + excess, state.warmup_sum)
    first = count == warm  # first update after the warm-up
    if warm > 0:
      base = jnp.where(first, warmup_sum / warm, state.base)
      use_base = True
    else:
      base = jnp.where(first, excess, state.base)
      use_base = ~first
    stepped = excess_mtl_weights(
      excess, state.weights, base, robust_step_size=robust_step_size, use_base=use_base
    )
    weights = jnp.where(in_warmup, state.weights, stepped)
    out = weighted_sum(updates, weights.astype(acc))
    out = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)
    # a non-finite input keeps the whole state: the kernel's leaves in place
    # (no pass over them when finite), the others with `where`
    sq_leaves, sq_def = jax.tree_util.tree_flatten(sq_sum)
    old_leaves = jax.tree_util.tree_leaves(state.sq_sum)
    sq_sum = jax.tree_util.tree_unflatten(
      sq_def,
      [
        _keep_if(finite, new, old) if on_kernel else jnp.where(finite, new, old).astype(old.dtype)
        for new, old, on_kernel in zip(sq_leaves, old_leaves, kernel_leaves)
      ],
    )
    small = ExcessMTLState(None, weights, base, warmup_sum, count + 1)
    small = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old).astype(old.dtype),
      small,
      state._replace(sq_sum=None),
    )
    return out, small._replace(sq_sum=sq_sum)

  return CoordinatewiseMethod(init_fn, update_fn)
