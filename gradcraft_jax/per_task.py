"""Per-task losses and stacked per-task gradients in one forward pass."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gradcraft_jax import _dense_gram

__all__ = ["per_task_value_and_grad"]

_GRAM_MODES = ("auto", "dense", "pullback")
_CALLER = "per_task_value_and_grad"


def _check_gram(gram):
  if gram not in _GRAM_MODES:
    raise ValueError(f"gram must be one of {_GRAM_MODES}, got {gram!r}")


def _split_args(args, argnums):
  single = isinstance(argnums, int)
  nums = (argnums,) if single else tuple(argnums)
  for n in nums:
    if not -len(args) <= n < len(args):
      raise ValueError(f"argnums {argnums} out of range for {len(args)} positional arguments")
  nums = tuple(n % len(args) for n in nums)
  return single, nums


def _plain_vjp(fun, args, argnums, has_aux, caller):
  """``fun``'s forward pass and VJP in the differentiated arguments:
  ``(single, nums, primals, f_of_primals, losses, vjp_fn, aux)``."""
  single, nums = _split_args(args, argnums)
  primals = tuple(args[n] for n in nums)

  def f_of_primals(*ps):
    full = list(args)
    for n, p in zip(nums, ps):
      full[n] = p
    return fun(*full)

  aux = None
  if has_aux:
    losses, vjp_fn, aux = jax.vjp(f_of_primals, *primals, has_aux=True)
  else:
    losses, vjp_fn = jax.vjp(f_of_primals, *primals)
  _dense_gram.check_loss_vector(losses, caller)
  return single, nums, primals, f_of_primals, losses, vjp_fn, aux


def per_task_value_and_grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  chunk_size: int | None = None,
  gram: str = "auto",
  on_fallback: str = "warn",
) -> Callable[..., Any]:
  r"""Task losses and their stacked gradients from one forward pass.

  ``fun(params, *args)`` returns a vector of ``T`` task losses
  ``l = (l_1, ..., l_T)``. The returned function evaluates ``fun`` once,
  keeps its VJP, and pulls back the ``T`` one-hot cotangents ``e_i`` with
  ``jax.vmap``, so that row ``i`` of every gradient leaf is
  :math:`\partial l_i / \partial \theta = e_i^\top J`. The result equals
  ``jax.jacrev(fun)`` (the Jacobian) at the cost of one forward pass and a
  batched backward pass.

  Args:
    fun: function returning a ``(T,)`` array of losses (or ``(losses, aux)``
      with ``has_aux=True``).
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    chunk_size: if given, pull back this many tasks at a time with
      ``jax.lax.map`` (bounded memory for large ``T``; same result). The
      dense route (``gram``) is not used with ``chunk_size``.
    gram: how the per-task gradients of dense weights are formed (the
      spelling of :func:`~gradcraft_jax.combined_value_and_grad`).
      ``"auto"`` (default): a real floating-point weight whose only use is
      one real floating-point dense product ``y = a W`` (found in the traced
      function, as :func:`~gradcraft_jax.gram_coverage` lists them) gets its
      ``T`` gradients ``a^T d_t`` as one batched product in the stacked
      layout, with the product's own ``precision`` and
      ``preferred_element_type``, where that is cheaper than the batched
      pullback (no more rows than output features); every other leaf (and
      every leaf with ``"pullback"``) from the ``T`` batched pullbacks.
      ``"dense"``: the batched product for every dense weight found. The
      routes compute the same products as autodiff, so they agree with
      ``jax.jacrev`` to rounding.
    on_fallback: what to do when the dense route cannot be taken (``fun``
      cannot be traced with abstract arguments, or the analysis fails) and
      the plain batched pullback is used instead (same result):
      ``"warn"`` (default): a :class:`~gradcraft_jax.FallbackWarning`, once
      per trace; ``"silent"``; ``"raise"``: a ``RuntimeError``.

  Returns:
    A function with the signature of ``fun`` returning ``(losses, grads)``
    (``((losses, aux), grads)`` with ``has_aux``), where ``grads`` has the
    structure of the differentiated argument(s) and every leaf a leading
    task axis of size ``T``. A Python scalar leaf gets an array gradient, as
    with ``jax.jacrev``; an integer leaf the ``float0`` gradient that
    ``jax.vjp`` gives it (no values; the Gram matrix counts it as zero).

  Raises:
    TypeError: if a differentiated leaf is complex (gradcraft-jax supports
      real parameters only).
    ValueError: if ``fun`` does not return a 1-D vector of real losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> f = lambda w, x: jnp.stack([jnp.sum(w * x), jnp.sum(w ** 2)])
    >>> losses, g = per_task_value_and_grad(f)(jnp.array([1., 2.]), jnp.array([3., 4.]))
    >>> g
    Array([[3., 4.],
           [2., 4.]], dtype=float32)
  """
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  _check_gram(gram)
  _dense_gram.check_on_fallback(on_fallback)
  choose = _dense_gram.any_dense if gram == "dense" else _dense_gram.stacked_layout

  def dense_wrapped(args, kwargs):
    """The dense route as one unit: raises ``_dense_gram.Fallback`` if any
    part of it fails."""
    single, nums = _split_args(args, argnums)
    flat, p, losses, aux_leaves, vjp_fn, acts = _dense_gram.dense_vjp(
      functools.partial(fun, **kwargs) if kwargs else fun, args, nums, has_aux, choose, _CALLER
    )
    with _dense_gram.guarded("the dense per-task gradients"):
      eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
      g_leaves, g_zs = jax.vmap(vjp_fn)(eye)
      grads = list(g_leaves)
      for j, u in enumerate(p.uses):
        grads[u.leaf] = _dense_gram.per_task_grad(p, u, flat.diff[u.leaf], acts[j], g_zs[j])
      grads = jax.tree_util.tree_unflatten(flat.diff_tree, grads)
      grads = grads[0] if single else grads
      if has_aux:
        return (losses, jax.tree_util.tree_unflatten(flat.out_tree, list(aux_leaves))), grads
      return losses, grads

  def wrapped(*args, **kwargs):
    _, nums = _split_args(args, argnums)
    _dense_gram.check_real_leaves(tuple(args[n] for n in nums), _CALLER)
    if gram != "pullback" and chunk_size is None:
      try:
        return dense_wrapped(args, kwargs)
      except _dense_gram.Fallback as e:
        reason = f"{e.reason}: every leaf takes the batched pullback"
        _dense_gram.report(on_fallback, _CALLER, reason, e.__cause__)
    f = functools.partial(fun, **kwargs) if kwargs else fun
    single, _, _, _, losses, vjp_fn, aux = _plain_vjp(f, args, argnums, has_aux, _CALLER)
    t = losses.shape[0]
    eye = jnp.eye(t, dtype=losses.dtype)
    if chunk_size is None or chunk_size >= t:
      grads = jax.vmap(vjp_fn)(eye)
    else:
      nchunks = -(-t // chunk_size)
      pad = nchunks * chunk_size - t
      cot = jnp.concatenate([eye, jnp.zeros((pad, t), eye.dtype)])
      cot = cot.reshape(nchunks, chunk_size, t)
      grads = jax.lax.map(jax.vmap(vjp_fn), cot)
      grads = jax.tree_util.tree_map(
        lambda g: g.reshape((nchunks * chunk_size,) + g.shape[2:])[:t], grads
      )
    grads = grads[0] if single else grads
    value = (losses, aux) if has_aux else losses
    return value, grads

  return wrapped
