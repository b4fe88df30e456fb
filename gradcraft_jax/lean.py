r"""The lean training step: the combined gradient without stacked gradients.

Every method of the library updates with :math:`\sum_i w_i g_i`, where the
weights ``w`` depend on the per-task gradients ``g_i`` only through their
``T x T`` Gram matrix :math:`K = J J^\top` (``J`` the ``T x P`` Jacobian of
the task losses) and on the losses. So the combined gradient is the pullback
of one cotangent through the loss function:

.. math:: \sum_i w_i g_i = J^\top w = \operatorname{vjp}(w),

and the stacked gradients ``J`` (``T`` copies of the parameters) are never
needed as a whole. :func:`combined_value_and_grad`

1. runs ``fun`` forward once and keeps its VJP (``jax.vjp``);
2. if the method reads the Gram matrix, pulls back the ``T`` one-hot
   cotangents (batched with ``jax.vmap``) and reduces every parameter leaf's
   ``(T, ...)`` gradient to its ``(T, T)`` Gram block as soon as it is
   produced: XLA frees each leaf's per-task gradients after its block, so
   the peak holds one or a few leaves' ``T`` copies, never all ``T x P``.
   Leaves with structure take cheaper exact routes (``gram=``): task-local
   towers from one all-ones pullback (the batched one then stops where the
   towers read the shared trunk), dense layers and embedding tables from
   their outputs' per-task cotangents;
3. asks the method's weighting (``method.weighting``, also for one built
   by :func:`gradcraft_jax.inject_hyperparams`) for its weights; methods that read
   only the losses (``mean``, uncertainty weighting, DWA, NMT) skip step 2,
   so their step costs one forward and one backward pass, like a plain step;
4. pulls back ``w`` once: the combined gradient, shaped like the parameters.

The result equals ``method.update(stacked, state, params, task_losses=losses,
**extra_args)`` on the stacked per-task gradients of
:func:`gradcraft_jax.per_task_value_and_grad`, to floating-point rounding
(the weighted sum is formed by the backward pass instead of by
:func:`gradcraft_jax.weighted_sum`).

Step 4 needs the backward pass to be linear in the cotangent, which every
JAX primitive's is, and ``jax.custom_jvp``'s (JAX derives its transpose),
but not necessarily a ``jax.custom_vjp`` rule (gradient clipping applies
``clip`` to the cotangent). When the differentiated arguments reach a
``jax.custom_vjp`` (or ``fun`` cannot be traced to find out), the combined
gradient is instead the weighted sum of the ``T`` per-task pullbacks, as on
the stacked path: exact, with the stacked path's memory, and reported
(``on_fallback``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gradcraft_jax import _dense_gram, _lean_routes
from gradcraft_jax._dense_gram import FallbackWarning
from gradcraft_jax._guards import all_finite, keep_state_unless
from gradcraft_jax._stacked import gram_matrix, select_leaves, weighted_sum
from gradcraft_jax.per_task import _check_gram, _plain_vjp, _split_args
from gradcraft_jax.weighting import weigh, weighting_of

__all__ = ["combined_value_and_grad", "gram_coverage", "Coverage", "FallbackWarning"]

_CALLER = "combined_value_and_grad"


class Coverage(dict):
  """``{key path: reason}`` for every differentiated leaf (see
  :func:`gram_coverage`), with two attributes:

  * ``combined``: how the step forms the combined gradient, ``"one
    pullback of the weighted losses"`` or ``"weighted sum of per-task
    pullbacks"`` (a ``jax.custom_vjp`` is reached, or ``fun`` could not be
    traced to look for one);
  * ``fallbacks``: the reasons the step leaves a fast route, as it reports
    them (``on_fallback``); empty when it takes them all.

  Examples:
    >>> import jax.numpy as jnp
    >>> fun = lambda w, x: jnp.stack([jnp.sum(x @ w), jnp.sum((x @ w) ** 2)])
    >>> cov = gram_coverage(fun)(jnp.ones((8, 2)), jnp.ones((2, 8)))
    >>> isinstance(cov, dict), cov.fallbacks
    (True, ())
  """

  def __init__(self, reasons: dict, combined: str, fallbacks: tuple):
    super().__init__(reasons)
    self.combined = combined
    self.fallbacks = tuple(fallbacks)


_ONE_PULLBACK = "one pullback of the weighted losses"
_PER_TASK_SUM = "weighted sum of per-task pullbacks"


@dataclasses.dataclass
class _Route:
  """What the step does for one call, decided at trace time."""

  flat: Any  # _dense_gram.Flat, None when the analysis failed
  plan: Any  # _dense_gram.Plan, None when the analysis failed
  routes: Any  # _lean_routes.Routes: every structured route, or None (dense layers only)
  dense: bool  # whether the dense-layer route (perturbed function) is taken
  chunk_size: int | None  # the chunk size actually used
  per_task_sum: bool  # combined gradient as the weighted sum of per-task pullbacks
  fallbacks: list  # (reason, cause) pairs, in order
  leaf_reason: str  # the coverage of every leaf when the dense route is not taken


def _custom_vjps_of_plain(fun, full_args, nums):
  """The ``jax.custom_vjp`` functions the differentiated arguments reach,
  from a trace of ``fun`` with the other arguments as they are (concrete
  when they are), or None if that trace fails too."""
  primals = tuple(full_args[n] for n in nums)

  def f_of_primals(*ps):
    full = list(full_args)
    for n, p in zip(nums, ps):
      full[n] = p
    return fun(*full)

  try:
    closed = jax.make_jaxpr(f_of_primals)(*primals)
  except Exception:  # pylint: disable=broad-except
    return None
  return _dense_gram.custom_vjps(closed.jaxpr, len(jax.tree_util.tree_leaves(primals)))


def _plan_route(fun, full_args, nums, has_aux, gram, chunk_size) -> _Route:
  """The analysis, the custom-VJP rule and the chunking, decided together
  (the same decisions for the step and for :func:`gram_coverage`)."""
  fallbacks = []
  choose = _dense_gram.chooser(gram) if chunk_size is None else None
  if gram == "pullback":
    leaf_reason = "per-task pullback (gram='pullback')"
  else:
    leaf_reason = "per-task pullback (chunk_size: Gram rows from forward-mode products)"
  flat = p = None
  try:
    flat, p = _dense_gram.analyse(fun, full_args, nums, has_aux, choose, _CALLER)
    vjps = p.custom_vjps
  except _dense_gram.Fallback as e:
    if choose is not None:  # the dense route is lost (else: only the custom-VJP check)
      fallbacks.append((f"{e.reason}: every leaf takes its per-task pullback", e.__cause__))
      leaf_reason = f"per-task pullback ({e.reason})"
    vjps = _custom_vjps_of_plain(fun, full_args, nums)
  per_task_sum = vjps is None or bool(vjps)
  if vjps is None:
    what = "fun could not be traced to look for jax.custom_vjp rules"
  else:
    what = (
      f"the parameters reach jax.custom_vjp rule(s) {', '.join(vjps)}, which need not be "
      "linear in the cotangent"
    )
  if per_task_sum:
    fallbacks.append(
      (
        f"{what}: the combined gradient is the weighted sum of per-task pullbacks "
        "(the stacked path's memory)",
        None,
      )
    )
  if chunk_size is not None and per_task_sum:
    fallbacks.append(
      (
        "chunk_size is not used: the chunked Gram matrix needs forward-mode "
        "derivatives, which a jax.custom_vjp does not have; the Gram matrix comes "
        "from all T per-task pullbacks at once",
        None,
      )
    )
    chunk_size = None
    if p is not None:
      leaf_reason = "per-task pullback (chunk_size given)"
  dense = p is not None and choose is not None
  routes = None
  real_leaves = flat is not None and all(
    jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in flat.diff
  )
  if p is not None and choose is not None and not per_task_sum and real_leaves:  # dense
    # Towers, stacked experts and embedding tables (the head/trunk split
    # assumes every backward rule is linear in the cotangent: not taken
    # when a custom VJP is reached; integer leaves, whose cotangents are
    # float0, keep the dense route).
    try:
      with _dense_gram.guarded("the analysis of towers, experts and tables"):
        routes = _lean_routes.analyse(flat, choose, p)
    except _dense_gram.Fallback as e:
      fallbacks.append((f"{e.reason}: only dense layers take the identity", e.__cause__))
  return _Route(flat, p, routes, dense, chunk_size, per_task_sum, fallbacks, leaf_reason)


def _acc_dtype(leaves):
  """The dtype of the Gram blocks: at least float32, float64 with float64
  leaves (integer leaves have no gradient and do not count)."""
  dtypes = [jnp.result_type(x) for x in leaves]
  return jnp.result_type(jnp.float32, *[d for d in dtypes if jnp.issubdtype(d, jnp.inexact)])


def _build(route: _Route, leaves, arrays):
  """The dense route's forward pass and VJP (:func:`_dense_gram.build`),
  with the blocks of the covered leaves traced as a check."""
  p = route.plan
  acc = _acc_dtype(leaves)

  def check(acts, ds):
    return [_dense_gram.block(u, acts[j], ds[j], acc) for j, u in enumerate(p.uses)]

  return _dense_gram.build(route.flat, p, leaves, arrays, check)


def _build_lean(route: _Route, leaves, arrays):
  """The structured routes' forward pass and pullbacks
  (:func:`_lean_routes.lean_vjp`), with the Gram matrix and the weighted
  pullback traced as a check."""
  acc = _acc_dtype(leaves)
  with _dense_gram.guarded("the structured routes (towers, experts, tables)"):
    traced = _lean_routes.lean_vjp(route.flat, route.routes, leaves, arrays)
    t = traced.losses.shape[0]
    jax.eval_shape(
      lambda: (traced.gram([True] * len(leaves), acc), traced.pull_back(jnp.ones((t,), acc)))
    )
  return traced


def _take_dense(route: _Route, leaves, arrays):
  """``_build``'s result (or ``_build_lean``'s, where the structured routes
  apply), or None after recording why the dense route is left (then every
  leaf takes its per-task pullback)."""
  structured = None
  if route.routes is not None:
    try:
      return _build_lean(route, leaves, arrays)
    except _dense_gram.Fallback as e:
      structured = (f"{e.reason}: only dense layers take the identity", e.__cause__)
      route.fallbacks.append(structured)
      route.routes = None
  try:
    return _build(route, leaves, arrays)
  except _dense_gram.Fallback as e:
    if structured is not None:  # one report: the whole fast route is left
      route.fallbacks.remove(structured)
    route.fallbacks.append((f"{e.reason}: every leaf takes its per-task pullback", e.__cause__))
    route.dense = False
    route.leaf_reason = f"per-task pullback ({e.reason})"
    return None


def gram_coverage(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  gram="auto",
  chunk_size: int | None = None,
) -> Callable[..., Coverage]:
  """Where :func:`combined_value_and_grad` takes each parameter leaf's Gram
  block from, why a leaf keeps its per-task pullback, and which fast routes
  the step leaves.

  Returns:
    ``coverage(params, *args) -> Coverage``, a dict ``{key path: route}``,
    the route being

    * ``"task-local (tower)"``: the leaf reaches one task loss only (a
      per-task tower, gate or head); its block is ``|g_t|^2`` on the
      diagonal, from one pullback of the all-ones cotangent;
    * ``"task-local (per-task slices)"``: slice ``t`` of the leaf along a
      task axis reaches loss ``t`` only (towers stacked as ``(T, H, K)`` and
      used through ``einsum`` or ``vmap``); same;
    * ``"dense"``: one real floating-point dense product ``y = a W``; the
      block from activations and output cotangents (where that is the
      cheaper route, or ``gram="dense"``);
    * ``"dense (batched)"``: one ``dot_general`` with batch dimensions
      (stacked experts); the same identity per batch index;
    * ``"embedding"``: read only by row lookups (``table[ids]``,
      ``jnp.take``, Flax ``Embed``); the block from per-id sums of the
      lookups' output cotangents;
    * otherwise why the leaf keeps its per-task pullback (``"used by
      conv_general_dilated"``, ``"used more than once"``, ``"cast to
      int8"``, ``"per-task pullback (tracing fun with abstract arguments
      failed (...))"``, ...).

    Its ``combined`` and ``fallbacks`` attributes (:class:`Coverage`) say
    how the combined gradient is formed and list what the step reports
    through ``on_fallback``. It runs the step's own analysis and traces its
    fast route abstractly (``jax.eval_shape``), so it agrees with the step,
    fallbacks included. Trace-time only: nothing is computed.

  Examples:
    >>> import jax.numpy as jnp
    >>> def fun(p, x):
    ...   h = jnp.tanh(x @ p["w"] + p["b"])
    ...   return jnp.stack([jnp.sum(h), jnp.sum(h ** 2)])
    >>> p = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    >>> cov = gram_coverage(fun)(p, jnp.ones((2, 8)))
    >>> cov
    {"['b']": 'used by broadcast_in_dim', "['w']": 'dense'}
    >>> cov.combined, cov.fallbacks
    ('one pullback of the weighted losses', ())
  """
  _check_gram(gram)
  _check_chunk_size(chunk_size)

  def coverage(*args):
    single, nums = _split_args(args, argnums)
    _dense_gram.check_real_leaves(tuple(args[n] for n in nums), "gram_coverage")
    route = _plan_route(fun, args, nums, has_aux, gram, chunk_size)
    if route.dense:
      flat = route.flat
      jax.eval_shape(lambda ls, xs: _take_dense(route, ls, xs) and None, flat.diff, flat.arrays)
    paths = _leaf_paths(args, nums, single)
    if route.dense:
      source = route.routes if route.routes is not None else route.plan
      reasons = {paths[k]: source.reasons[k] for k in range(len(paths))}
    else:
      reasons = dict.fromkeys(paths, route.leaf_reason)
    combined = _PER_TASK_SUM if route.per_task_sum else _ONE_PULLBACK
    return Coverage(reasons, combined, tuple(r for r, _ in route.fallbacks))

  return coverage


def _leaf_paths(args, nums, single):
  primals = tuple(args[n] for n in nums)
  tree = primals[0] if single else primals
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _selected(paths, leaves) -> list:
  """Which leaves a Gram matrix sums over: all, or those whose key path
  satisfies ``leaves`` (:attr:`Weighting.gram_leaves`)."""
  sel = [leaves is None or bool(leaves(path)) for path in paths]
  if not any(sel):
    raise ValueError(
      "combined_value_and_grad: the leaf selection matches none of the "
      f"gradient leaves; their key paths are {paths}"
    )
  return sel


def _check_chunk_size(chunk_size):
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def combined_value_and_grad(
  fun: Callable[..., Any],
  method: Any,
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  chunk_size: int | None = None,
  gram: str = "auto",
  on_fallback: str = "warn",
) -> Callable[..., Any]:
  r"""Task losses and a method's combined gradient, without stacked gradients.

  Args:
    fun: ``fun(params, *args)`` returning a ``(T,)`` vector of task losses
      (``(losses, aux)`` with ``has_aux=True``).
    method: a method of the library that weights the tasks
      (``gradcraft(...)``, ``mgda()``, ``upgrad()``, ``nmt(...)``,
      ``mean()``, ..., :func:`~gradcraft_jax.from_weighting`, also built by
      :func:`~gradcraft_jax.inject_hyperparams`) or its
      :class:`~gradcraft_jax.Weighting`; not an ``optax.chain`` (chain the
      optimizer after the combined gradient instead).
    argnums: which positional argument(s) of ``fun`` to differentiate, as in
      ``jax.grad`` (``0`` is ``params``).
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    chunk_size: if given, the Gram matrix is formed ``chunk_size`` tasks at a
      time (``jax.lax.map`` over chunks): the per-task gradients of a chunk
      ``G_c`` are pulled back, and the chunk's rows of the Gram matrix
      :math:`K_{c,:} = G_c J^\top` are forward-mode derivatives of the losses
      along them (``jax.jvp``, batched over the chunk). The batched backward
      pass then holds ``chunk_size`` cotangents of every activation instead
      of ``T``, and ``chunk_size`` copies of the parameters, at the cost of
      ``T`` forward-mode passes. Same result to rounding. The dense-layer
      identity (``gram``) is not used with ``chunk_size``. Forward mode
      cannot differentiate a ``jax.custom_vjp``: when the parameters reach
      one, ``chunk_size`` is not used (reported through ``on_fallback``).
    gram: how the Gram matrix is formed. ``"auto"`` (default): every leaf
      takes the cheapest exact route the analysis of the traced function
      proves (see :func:`gram_coverage`):

      * *task-local* leaves (per-task towers, gates and heads, separate or
        stacked on a task axis; found by a reachability pass over the
        jaxpr): a diagonal block ``|g_t|^2`` from one pullback of the
        all-ones cotangent through the part of the function whose values
        reach one loss each (the *head*); the batched pullback of the ``T``
        one-hot cotangents starts where the head reads the shared *trunk*;
      * *dense* leaves (real floating-point parameters whose only use is one
        real floating-point ``dot_general``, through reshapes, transposes
        and float-to-float casts; with batch dimensions, the stacked-experts
        case, per batch index): the block
        :math:`\langle (a a^\top) d_s, d_t\rangle` from the activations
        ``a`` and the per-task output cotangents ``d_t`` (with ``a`` centred,
        so a large common offset does not cancel), when that is cheaper than
        the weight gradients (fewer rows than input features);
      * *embedding* tables read by row gathers (``table[ids]``,
        ``jnp.take``, Flax ``Embed``; several lookups and features sharing
        the table, multi-valued ids, duplicates, the gather's clamping or
        dropping of out-of-range ids): :math:`\sum_v \langle S_s[v],
        S_t[v]\rangle` with ``S_t[v]`` the sum of task ``t``'s lookup
        cotangents of id ``v``: memory ``O(T x lookups x D)``, never ``T``
        copies of the table;
      * every other leaf: its ``T`` per-task gradients, reduced to its block.

      ``"dense"``: the dense identity for every dense use found, even where
      dearer (task-local leaves included). ``"pullback"``: per-task
      pullbacks for every leaf. The routes are equal in exact arithmetic; in
      floating point they are as accurate as the per-task pullbacks against
      a float64 reference (``docs/scaling.md`` has the measured errors).
    on_fallback: what to do when a fast route cannot be taken and the step
      takes its plain route instead (same result, more time or memory):
      ``fun`` cannot be traced with abstract arguments, the analysis fails,
      or the parameters reach a ``jax.custom_vjp`` (see below).
      ``"warn"`` (default): a :class:`~gradcraft_jax.FallbackWarning`, once
      per trace; ``"silent"``; ``"raise"``: a ``RuntimeError``.
      :func:`gram_coverage` lists the same reasons.

  Returns:
    ``step(params, method_state, *args, **extra_args) -> (losses, grads,
    new_method_state)`` (``((losses, aux), grads, new_method_state)`` with
    ``has_aux``), where ``fun`` is called as ``fun(params, *args)``,
    ``method_state`` is ``method.init(params)``'s state, and ``grads`` (the
    structure of the differentiated argument(s), like ``jax.grad``) equals

    .. code-block:: python

      losses, stacked = per_task_value_and_grad(fun, argnums)(params, *args)
      grads, new_state = method.update(
          stacked, method_state, params, task_losses=losses, **extra_args)

    to floating-point rounding. ``extra_args`` go to the method like an
    update's extra arguments; ``task_losses=`` overrides the losses the
    method reads. When the Gram matrix or the losses the method reads are
    not finite, ``grads`` is non-finite and the state is kept. Jittable;
    works with sharded parameters and batches.

  Cost: one forward pass, one backward pass through the head, ``T``
  batched backward passes through the trunk only if the method reads the
  Gram matrix (each leaf's per-task gradients, where it has no cheaper
  route, are reduced to its Gram block and dropped), and one backward pass
  of the weighted losses through the trunk (the head's is reused: it is
  linear in the cotangent and carries one task per slice). Compiled
  temporary memory: a plain step's, plus ``T`` cotangents of the trunk's
  activations (embedding lookups included) and the per-task gradients of the
  largest uncovered leaves, instead of all ``T`` copies of the parameters.

  Custom derivatives: one backward pass of the weighted losses equals the
  weighted sum of the per-task gradients only if the backward pass is
  linear in the cotangent. ``jax.custom_jvp`` rules are (JAX derives their
  transpose); a ``jax.custom_vjp`` rule need not be (gradient clipping is
  not), and the library cannot tell. So when the differentiated arguments
  reach a ``jax.custom_vjp`` (inside ``jit``, ``scan``, ``cond``, ``remat``,
  ... too), or ``fun`` cannot be traced to find out, the combined gradient
  is the weighted sum of the ``T`` per-task pullbacks (the stacked path's
  memory), reported through ``on_fallback``.

  Raises:
    TypeError: at construction, if ``method`` has no task weights (see
      :func:`~gradcraft_jax.weighting_of`); at the call, if a differentiated
      leaf is complex.
    ValueError: if ``fun`` does not return a 1-D vector of real losses.
    RuntimeError: with ``on_fallback="raise"``, when a fast route is left.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> def fun(w, x):
    ...   return jnp.stack([jnp.sum((x @ w - 1.0) ** 2), jnp.sum((x @ w + 1.0) ** 2)])
    >>> w, x = jnp.ones((3,)), jnp.eye(3)
    >>> method = gj.mgda()
    >>> step = jax.jit(combined_value_and_grad(fun, method))
    >>> losses, grads, state = step(w, method.init(w), x)
    >>> grads.shape
    (3,)
    >>> _, stacked = gj.per_task_value_and_grad(fun)(w, x)
    >>> ref, _ = method.update(stacked, method.init(w), w, task_losses=losses)
    >>> bool(jnp.allclose(grads, ref, atol=1e-6))
    True
  """
  weighting = weighting_of(method, "combined_value_and_grad")
  _check_gram(gram)
  _check_chunk_size(chunk_size)
  _dense_gram.check_on_fallback(on_fallback)

  def weigh_and_pull_back(losses, method_state, extra_args, gram_fn, pull_back):
    """The method's weights (its Gram pass through ``gram_fn``), then one
    pullback of them; a non-finite combined gradient keeps the method's
    previous state, as on the stacked path (inputs the weighting does not
    read may be non-finite)."""
    task_losses = extra_args.pop("task_losses", losses)
    weights, new_state = weigh(
      weighting,
      method_state,
      num_tasks=losses.shape[0],
      gram_fn=gram_fn,
      task_losses=task_losses,
      dtype=jnp.result_type(jnp.float32, losses.dtype),
      extra_args=extra_args,
    )
    grads = pull_back(jax.lax.stop_gradient(weights).astype(losses.dtype))
    ok = all_finite(grads)
    return grads, keep_state_unless(ok, new_state, method_state)

  def per_task_sum(vjp_leaves, t, dtype):
    """The combined gradient as the weighted sum of the ``T`` per-task
    pullbacks (exact for any backward rule, linear in the cotangent or
    not)."""
    eye = jnp.eye(t, dtype=dtype)
    return lambda w: weighted_sum(jax.vmap(vjp_leaves)(eye), w)

  def traced_result(flat, single, losses, aux_leaves, grads, new_state):
    """The step's output from the traced function's flat leaves."""
    grads = jax.tree_util.tree_unflatten(flat.diff_tree, grads)
    grads = grads[0] if single else grads
    if has_aux:
      aux = jax.tree_util.tree_unflatten(flat.out_tree, list(aux_leaves))
      return (losses, aux), grads, new_state
    return losses, grads, new_state

  def lean_step(route, traced, single, method_state, extra_args):
    """The step on the structured routes (towers, experts, tables, dense)."""
    flat, losses, aux_leaves = route.flat, traced.losses, traced.aux_leaves
    paths = flat.leaf_paths(single)
    acc = _acc_dtype(flat.diff)

    def gram_fn(leaves=None):
      sel = _selected(paths, leaves)
      return traced.gram(sel, acc)

    grads, new_state = weigh_and_pull_back(
      losses, method_state, extra_args, gram_fn, traced.pull_back
    )
    return traced_result(flat, single, losses, aux_leaves, grads, new_state)

  def dense_step(route, traced, single, method_state, extra_args):
    """The step on the dense route (``fun`` traced once)."""
    flat, p = route.flat, route.plan
    losses, aux_leaves, vjp_fn, acts = traced
    nd = len(flat.diff)
    t = losses.shape[0]
    eye = jnp.eye(t, dtype=losses.dtype)
    paths = flat.leaf_paths(single)
    covered = {u.leaf: j for j, u in enumerate(p.uses)}
    acc = _acc_dtype(flat.diff)

    def gram_fn(leaves=None):
      sel = _selected(paths, leaves)
      g_leaves, g_zs = jax.vmap(vjp_fn)(eye)
      rest = [g_leaves[k] for k in range(nd) if sel[k] and k not in covered]
      k_mat = gram_matrix(rest).astype(acc) if rest else jnp.zeros((t, t), acc)
      for j, u in enumerate(p.uses):
        if sel[u.leaf]:
          k_mat = k_mat + _dense_gram.block(u, acts[j], g_zs[j], acc)
      return 0.5 * (k_mat + k_mat.T)

    if route.per_task_sum:
      pull_back = per_task_sum(lambda c: vjp_fn(c)[0], t, losses.dtype)
    else:
      pull_back = lambda w: vjp_fn(w)[0]  # noqa: E731
    grads, new_state = weigh_and_pull_back(losses, method_state, extra_args, gram_fn, pull_back)
    return traced_result(flat, single, losses, aux_leaves, grads, new_state)

  def step(params, method_state, *args, **extra_args):
    full_args = (params, *args)
    single, nums = _split_args(full_args, argnums)
    _dense_gram.check_real_leaves(tuple(full_args[n] for n in nums), _CALLER)
    route = _plan_route(fun, full_args, nums, has_aux, gram, chunk_size)
    traced = _take_dense(route, route.flat.diff, route.flat.arrays) if route.dense else None
    for reason, cause in route.fallbacks:
      _dense_gram.report(on_fallback, _CALLER, reason, cause)
    if isinstance(traced, _lean_routes.LeanVJP):
      return lean_step(route, traced, single, method_state, extra_args)
    if traced is not None:
      return dense_step(route, traced, single, method_state, extra_args)
    single, _, primals, f_of_primals, losses, vjp_fn, aux = _plain_vjp(
      fun, full_args, argnums, has_aux, _CALLER
    )
    t = losses.shape[0]
    chunk = route.chunk_size
    eye = jnp.eye(t, dtype=losses.dtype)

    def gram_fn(leaves=None):
      # T batched pullbacks reduced leaf by leaf to (T, T) blocks: only the
      # Gram matrix leaves this function, so each leaf's (T, ...) gradient
      # is dead as soon as its block is formed. ``leaves``: a key-path
      # predicate (Weighting.gram_leaves) on the differentiated argument's
      # tree (the tuple of them for several argnums).
      stacked = jax.vmap(vjp_fn)(eye)
      stacked = stacked[0] if single else stacked
      if leaves is not None:
        stacked = select_leaves(stacked, leaves, "combined_value_and_grad")
      return gram_matrix(stacked)

    def gram_fn_chunked(leaves=None):
      if leaves is not None:  # a leaf-subset Gram: from the pullbacks
        return gram_fn(leaves)

      # Rows of K = J J^T, chunk by chunk: G_c = pullbacks of the chunk's
      # one-hot cotangents, K[c, :] = J G_c^T = JVPs of the losses along them.
      def losses_only(*ps):
        out = f_of_primals(*ps)
        return out[0] if has_aux else out

      def rows(cots):
        g = jax.vmap(vjp_fn)(cots)
        return jax.vmap(lambda tangents: jax.jvp(losses_only, primals, tangents)[1])(g)

      nchunks = -(-t // chunk)
      pad = nchunks * chunk - t
      cots = jnp.concatenate([eye, jnp.zeros((pad, t), eye.dtype)])
      k = jax.lax.map(rows, cots.reshape(nchunks, chunk, t))
      k = k.reshape(nchunks * chunk, t)[:t]
      acc = jnp.result_type(jnp.float32, k.dtype)
      k = k.astype(acc)
      return 0.5 * (k + k.T)

    grads, new_state = weigh_and_pull_back(
      losses,
      method_state,
      extra_args,
      gram_fn if chunk is None or chunk >= t else gram_fn_chunked,
      per_task_sum(vjp_fn, t, losses.dtype) if route.per_task_sum else vjp_fn,
    )
    grads = grads[0] if single else grads
    value = (losses, aux) if has_aux else losses
    return value, grads, new_state

  return step
