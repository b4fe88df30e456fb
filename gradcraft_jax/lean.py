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
3. asks the method for its weights (:func:`gradcraft_jax.task_weights`'
   protocol, also through ``optax.inject_hyperparams``); methods that read
   only the losses (``mean``, uncertainty weighting, DWA, NMT) skip step 2,
   so their step costs one forward and one backward pass, like a plain step;
4. pulls back ``w`` once: the combined gradient, shaped like the parameters.

The result equals ``method.update(stacked, state, params, task_losses=losses,
**extra_args)`` on the stacked per-task gradients of
:func:`gradcraft_jax.per_task_value_and_grad`, to floating-point rounding
(the weighted sum is formed by the backward pass instead of by
:func:`gradcraft_jax.weighted_sum`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax import _dense_gram, _lean_routes
from gradcraft_jax._stacked import gram_matrix, select_leaves
from gradcraft_jax.per_task import _plain_vjp, _split_args
from gradcraft_jax.weighting import _all_finite, check_method, keep_state_unless, query_weights

__all__ = ["combined_value_and_grad", "gram_coverage"]

_GRAM_MODES = ("auto", "dense", "pullback")


def gram_coverage(
  fun: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False, *, gram="auto"
) -> Callable[..., dict]:
  """Where :func:`combined_value_and_grad` takes each parameter leaf's Gram
  block from, and why a leaf keeps its per-task pullback.

  Returns:
    ``coverage(params, *args) -> {key path: route}``, the route being

    * ``"task-local (tower)"``: the leaf reaches one task loss only (a
      per-task tower, gate or head); its block is ``|g_t|^2`` on the
      diagonal, from one pullback of the all-ones cotangent;
    * ``"task-local (per-task slices)"``: slice ``t`` of the leaf along a
      task axis reaches loss ``t`` only (towers stacked as ``(T, H, K)`` and
      used through ``einsum`` or ``vmap``, a ``(H, T)`` head); same;
    * ``"dense"``: one dense product ``y = a W``; the block
      :math:`\langle (a a^\top) d_s, d_t\rangle` from activations and
      output cotangents (where that is the cheaper route, or
      ``gram="dense"``);
    * ``"dense (batched)"``: one ``dot_general`` with batch dimensions
      (stacked experts); the same identity per batch index;
    * ``"embedding"``: read only by row lookups (``table[ids]``,
      ``jnp.take``, Flax ``Embed``); the block from per-id sums of the
      lookups' output cotangents;
    * otherwise why the leaf keeps its per-task pullback (``"used by
      conv_general_dilated"``, ``"used more than once"``, ``"used by gather
      (not a lookup of whole rows)"``, ...).

    Trace-time only: nothing is computed.

  >>> import jax.numpy as jnp
  >>> def fun(p, x):
  ...   h = jnp.tanh(x @ p["w"] + p["b"])
  ...   return jnp.stack([jnp.sum(h), jnp.sum(h ** 2)])
  >>> p = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  >>> gram_coverage(fun)(p, jnp.ones((2, 8)))
  {"['b']": 'used by broadcast_in_dim', "['w']": 'dense'}
  """
  if gram not in _GRAM_MODES:
    raise ValueError(f"gram must be one of {_GRAM_MODES}, got {gram!r}")

  def coverage(*args):
    single, nums = _split_args(args, argnums)
    flat = _dense_gram.Flat(fun, args, nums, has_aux)
    paths = flat.leaf_paths(single)
    if gram == "pullback":
      return {path: "per-task pullback (gram='pullback')" for path in paths}
    reasons = _lean_routes.analyse(flat, _dense_gram.chooser(gram)).reasons
    return {paths[k]: reasons[k] for k in range(len(paths))}

  return coverage


def combined_value_and_grad(
  fun: Callable[..., Any],
  method: optax.GradientTransformation,
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  chunk_size: int | None = None,
  gram: str = "auto",
) -> Callable[..., Any]:
  r"""Task losses and a method's combined gradient, without stacked gradients.

  Args:
    fun: ``fun(params, *args)`` returning a ``(T,)`` vector of task losses
      (``(losses, aux)`` with ``has_aux=True``).
    method: a method transform of the library (``gradcraft(...)``,
      ``mgda()``, ``upgrad()``, ``nmt(...)``, ``mean()``, ...,
      :func:`~gradcraft_jax.from_weighting`), possibly wrapped in
      ``optax.inject_hyperparams``; not an ``optax.chain`` (chain the
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
      identity (``gram``) is not used with ``chunk_size``.
    gram: how the Gram matrix is formed. ``"auto"`` (default): every leaf
      takes the cheapest exact route the analysis of the traced function
      proves (see :func:`gram_coverage`):

      * *task-local* leaves (per-task towers, gates and heads, separate or
        stacked on a task axis; found by a reachability pass over the
        jaxpr): a diagonal block ``|g_t|^2`` from ONE pullback of the
        all-ones cotangent through the part of the function whose values
        reach one loss each (the *head*). The batched pullback of the ``T``
        one-hot cotangents starts where the head reads the shared *trunk*,
        from the per-task cotangents there, and never runs through the
        towers;
      * *dense* leaves (one ``dot_general``; with batch dimensions, the
        stacked-experts case, per batch index): the block
        :math:`\langle (a a^\top) d_s, d_t\rangle` from the activations
        ``a`` and the per-task output cotangents ``d_t``, when that is
        cheaper than the weight gradients (fewer rows than input features);
      * *embedding* tables read by row gathers (``table[ids]``,
        ``jnp.take``, Flax ``Embed``; several lookups and features sharing
        the table, multi-valued ids, duplicates, the gather's clamping or
        dropping of out-of-range ids): :math:`\sum_v \langle S_s[v],
        S_t[v]\rangle` with ``S_t[v]`` the sum of task ``t``'s lookup
        cotangents of id ``v``: memory ``O(T x lookups x D)``, never
        ``T`` copies of the table;
      * every other leaf: its ``T`` per-task gradients, reduced to its block.

      ``"dense"``: the dense identity for every dense use found, even where
      dearer (task-local leaves included). ``"pullback"``: per-task
      pullbacks for every leaf. All are exact.

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

  Raises:
    TypeError: at construction, if ``method`` is not a method transform of
      the library.
    ValueError: if ``fun`` does not return a 1-D vector of losses.

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
  check_method(method, "combined_value_and_grad")
  if gram not in _GRAM_MODES:
    raise ValueError(f"gram must be one of {_GRAM_MODES}, got {gram!r}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

  def weigh_and_pull_back(losses, method_state, extra_args, gram_fn, pull_back):
    """The method's weights (its Gram pass through ``gram_fn``), then one
    pullback of them; a non-finite combined gradient keeps the method's
    previous state, as on the stacked path (inputs the weighting does not
    read may be non-finite)."""
    task_losses = extra_args.pop("task_losses", losses)
    weights, new_state = query_weights(
      method,
      method_state,
      num_tasks=losses.shape[0],
      gram_fn=gram_fn,
      task_losses=task_losses,
      caller="combined_value_and_grad",
      **extra_args,
    )
    grads = pull_back(jax.lax.stop_gradient(weights).astype(losses.dtype))
    ok = _all_finite(*jax.tree_util.tree_leaves(grads))
    return grads, keep_state_unless(ok, new_state, method_state)

  def dense_step(params, method_state, *args, **extra_args):
    """The step with the dense-layer identity (``fun`` traced once); None
    if the analysis of ``fun`` failed."""
    full_args = (params, *args)
    single, nums = _split_args(full_args, argnums)
    traced = _lean_routes.lean_vjp(fun, full_args, nums, has_aux, _dense_gram.chooser(gram))
    if traced is None:
      return None
    flat, losses, aux_leaves = traced.flat, traced.losses, traced.aux_leaves
    paths = flat.leaf_paths(single)
    acc = jnp.result_type(jnp.float32, *[x.dtype for x in flat.diff])

    def gram_fn(leaves=None):
      sel = [leaves is None or bool(leaves(path)) for path in paths]
      if not any(sel):
        raise ValueError(
          "combined_value_and_grad: the leaf selection matches none of the "
          f"gradient leaves; their key paths are {paths}"
        )
      return traced.gram(sel, acc)

    grads, new_state = weigh_and_pull_back(
      losses, method_state, extra_args, gram_fn, traced.pull_back
    )
    grads = jax.tree_util.tree_unflatten(flat.diff_tree, grads)
    grads = grads[0] if single else grads
    if has_aux:
      aux = jax.tree_util.tree_unflatten(flat.out_tree, list(aux_leaves))
      return (losses, aux), grads, new_state
    return losses, grads, new_state

  def step(params, method_state, *args, **extra_args):
    if gram != "pullback" and chunk_size is None:
      out = dense_step(params, method_state, *args, **extra_args)
      if out is not None:
        return out
    single, _, primals, f_of_primals, losses, vjp_fn, aux = _plain_vjp(
      fun, (params, *args), argnums, has_aux, "combined_value_and_grad"
    )
    t = losses.shape[0]

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

      nchunks = -(-t // chunk_size)
      pad = nchunks * chunk_size - t
      cots = jnp.concatenate([eye, jnp.zeros((pad, t), eye.dtype)])
      k = jax.lax.map(rows, cots.reshape(nchunks, chunk_size, t))
      k = k.reshape(nchunks * chunk_size, t)[:t]
      acc = jnp.result_type(jnp.float32, k.dtype)
      k = k.astype(acc)
      return 0.5 * (k + k.T)

    grads, new_state = weigh_and_pull_back(
      losses,
      method_state,
      extra_args,
      gram_fn if chunk_size is None or chunk_size >= t else gram_fn_chunked,
      vjp_fn,
    )
    grads = grads[0] if single else grads
    value = (losses, aux) if has_aux else losses
    return value, grads, new_state

  return step
