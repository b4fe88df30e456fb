"""Per-task losses and stacked per-task gradients in one forward pass."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gradcraft_jax import _dense_gram

__all__ = ["per_task_value_and_grad"]


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
  dense: bool = True,
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
      ``jax.lax.map`` (bounded memory for large ``T``; same result).

  Returns:
    A function with the signature of ``fun`` returning ``(losses, grads)``
    (``((losses, aux), grads)`` with ``has_aux``), where ``grads`` has the
    structure of the differentiated argument(s) and every leaf a leading
    task axis of size ``T``.

  >>> import jax.numpy as jnp
  >>> f = lambda w, x: jnp.stack([jnp.sum(w * x), jnp.sum(w ** 2)])
  >>> losses, g = per_task_value_and_grad(f)(jnp.array([1., 2.]), jnp.array([3., 4.]))
  >>> g
  Array([[3., 4.],
         [2., 4.]], dtype=float32)
  """
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

  def dense_wrapped(args, kwargs):
    single, nums = _split_args(args, argnums)
    traced = _dense_gram.dense_vjp(
      functools.partial(fun, **kwargs) if kwargs else fun,
      args,
      nums,
      has_aux,
      _dense_gram.stacked_layout,
      caller="per_task_value_and_grad",
    )
    if traced is None:
      return None
    flat, p, losses, aux_leaves, vjp_fn, acts = traced
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
    if dense and chunk_size is None:
      out = dense_wrapped(args, kwargs)
      if out is not None:
        return out
    f = functools.partial(fun, **kwargs) if kwargs else fun
    single, _, _, _, losses, vjp_fn, aux = _plain_vjp(
      f, args, argnums, has_aux, "per_task_value_and_grad"
    )
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
