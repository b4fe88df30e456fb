r"""The Gram matrix of dense layers from activations and output cotangents.

For a parameter ``W`` whose only use in the loss function is one dense
product ``y = a W`` (``a``: ``R x C`` rows of activations, ``W``: ``C x F``,
any ``dot_general`` without batch dimensions, ``W`` possibly reshaped,
transposed or cast on the way), the per-task gradient is ``a^T d_t`` with
``d_t = dl_t / dy`` (``R x F``), so its block of the Gram matrix is

.. math:: \langle a^\top d_s, a^\top d_t \rangle_F
   = \langle (a a^\top) d_s, d_t \rangle_F ,

which costs ``R^2 C + T R^2 F + T^2 R F`` multiply-adds instead of the
``T R C F`` of the weight gradients: cheaper whenever there are fewer rows
than input features (batch 256 against 1024 features: about 4x).

:func:`plan` finds such products in any traced function, without the user's
help: it traces the loss function to a jaxpr (calls to ``jax.jit`` inlined),
follows every differentiated leaf through reshapes, transposes and casts, and
marks the leaf *covered* when that chain ends in exactly one
``dot_general`` and the identity is cheaper there (or ``force``).
:func:`perturbed_fn` re-evaluates the jaxpr with a zero perturbation added to
the output of every covered product and returns the products' activations;
the cotangents of the perturbations are the ``d_t``. Every other leaf (biases,
normalisation scales, embeddings, convolutions, a weight used twice, a weight
inside ``scan``, ``remat`` or a custom derivative) keeps its ordinary
per-task pullback. The result is exact: the identity is an equality, applied
only where its premise (a single dense use) holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Primitives through which a parameter's per-task gradient is a permuted (or
# re-typed) copy of the gradient of the primitive's output: inner products
# are preserved (up to the rounding of a cast).
_VIEWS = frozenset(
  {
    "reshape",
    "transpose",
    "convert_element_type",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reshard",
    "sharding_constraint",
    "mesh_cast",
  }
)
# Call primitives whose body is inlined before the analysis.
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})


@dataclasses.dataclass(frozen=True)
class DenseUse:
  """One covered dense product: equation ``eqn`` of the inlined jaxpr."""

  leaf: int  # index of the differentiated leaf
  eqn: int  # index of the dot_general in the inlined jaxpr
  act_pos: int  # 0 if the activation is the dot's lhs, 1 if the rhs
  act_contract: tuple  # contracting dimensions of the activation
  w_contract: tuple  # contracting dimensions of the weight operand (same order)
  chain: tuple  # indices of the view equations from the leaf to the dot
  rows: int  # R
  cols: int  # C
  feats: int  # F


@dataclasses.dataclass(frozen=True)
class Plan:
  jaxpr: Any  # ClosedJaxpr, jit calls inlined
  uses: tuple  # DenseUse, one per covered leaf
  reasons: dict  # leaf index -> why it is not covered (or "dense")


def check_loss_vector(losses, caller: str) -> None:
  """The loss function's output must be the ``(T,)`` vector of task losses."""
  if jnp.ndim(losses) != 1:
    raise ValueError(
      f"{caller}: fun must return a 1-D vector of task losses, got shape {jnp.shape(losses)}"
    )


def chooser(gram: str) -> Callable:
  """The ``plan`` choice for a ``gram`` mode of the lean step."""
  return any_dense if gram == "dense" else cheaper_gram


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


class Flat:
  """``fun`` as a function of flat array leaves: the differentiated leaves
  first, then the array leaves of the other positional arguments (the rest
  stay closed over, as Python values)."""

  def __init__(self, fun, full_args, nums, has_aux, caller="combined_value_and_grad"):
    self.fun, self.full_args, self.nums, self.has_aux = fun, full_args, nums, has_aux
    self.caller = caller
    primals = tuple(full_args[n] for n in nums)
    self.diff, self.diff_tree = jax.tree_util.tree_flatten(primals)
    others = tuple(x for n, x in enumerate(full_args) if n not in nums)
    self.other_leaves, self.other_tree = jax.tree_util.tree_flatten(others)
    self.mask = [_is_array(x) for x in self.other_leaves]
    self.arrays = [x for x, m in zip(self.other_leaves, self.mask) if m]
    self.out_tree = None

  def __call__(self, *xs):
    nd = len(self.diff)
    arrays = iter(xs[nd:])
    other = [next(arrays) if m else x for x, m in zip(self.other_leaves, self.mask)]
    primals = jax.tree_util.tree_unflatten(self.diff_tree, list(xs[:nd]))
    others = iter(jax.tree_util.tree_unflatten(self.other_tree, other))
    full = [
      primals[self.nums.index(n)] if n in self.nums else next(others)
      for n in range(len(self.full_args))
    ]
    out = self.fun(*full)
    losses, rest = (out[0], out[1]) if self.has_aux else (out, None)
    check_loss_vector(losses, self.caller)
    rest_leaves, self.out_tree = jax.tree_util.tree_flatten(rest)
    return [losses, *rest_leaves]

  def leaf_paths(self, single):
    primals = tuple(self.full_args[n] for n in self.nums)
    tree = primals[0] if single else primals
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def dense_vjp(fun, full_args, nums, has_aux, choose, caller="combined_value_and_grad"):
  """``fun``'s forward pass with zero perturbations on its covered dense
  outputs: ``(flat, plan, losses, aux_leaves, vjp_fn, acts)``, where
  ``vjp_fn(cotangent of the losses) -> (leaf cotangents, perturbation
  cotangents)``. With no covered use it is the plain pullback of the
  traced function (``fun`` is traced once either way). None when the
  analysis fails; the caller then takes its plain route (which raises the
  user's own error, if that was the cause)."""
  try:
    flat = Flat(fun, full_args, nums, has_aux, caller)
    p = plan(flat, [*flat.diff, *flat.arrays], len(flat.diff), choose)
  except Exception:  # pylint: disable=broad-except
    return None
  g = perturbed_fn(p, flat.arrays)
  eqns = p.jaxpr.jaxpr.eqns
  zs = []
  for u in p.uses:
    aval = eqns[u.eqn].outvars[0].aval
    zs.append(jnp.zeros(aval.shape, aval.dtype))

  def h(leaves, zs):
    outs, acts = g(leaves, zs)
    return outs[0], (outs[1:], acts)

  losses, vjp_fn, (aux_leaves, acts) = jax.vjp(h, list(flat.diff), zs, has_aux=True)
  return flat, p, losses, aux_leaves, vjp_fn, acts


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def evaluate(jaxpr, consts, args, hook=None):
  """Evaluate ``jaxpr``; ``hook(i, invals, outvals) -> outvals`` per equation
  of the top level (call primitives of ``_INLINE`` are evaluated inline only
  when ``hook`` is None, i.e. while inlining)."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [_read(env, v) for v in eqn.invars]
    if hook is None and eqn.primitive.name in _INLINE:
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(sub, jcore.ClosedJaxpr):
        outs = evaluate(sub.jaxpr, sub.consts, invals)
      else:
        outs = evaluate(sub, (), invals)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if hook is not None:
        outs = hook(i, invals, outs)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [_read(env, v) for v in jaxpr.outvars]


def _inline(closed, args):
  """The same function as ``closed`` with every jit call inlined (to a
  fixed point: nested jits are inlined too), traced again at ``args``."""
  for _ in range(32):
    if not any(e.primitive.name in _INLINE for e in closed.jaxpr.eqns):
      return closed
    closed = jax.make_jaxpr(lambda *a, c=closed: evaluate(c.jaxpr, c.consts, a))(*args)
  return closed


def _explicitly_sharded(aval) -> bool:
  """Whether ``aval`` is split over an explicit mesh axis (then ``a a^T``
  would need the whole activation on every device: the weight gradients,
  reduced locally and all-reduced, are the better route)."""
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not getattr(mesh, "explicit_axes", ()):
    return False
  return any(s is not None for s in sharding.spec)


def _identity_cost(r, c, f, t):
  return r * r * c + t * r * r * f + t * t * r * f


def _pullback_cost(r, c, f, t):
  return t * r * c * f + t * t * c * f


def cheaper_gram(r, c, f, t):
  """``plan``'s default choice: the identity where it costs less than the
  weight gradients."""
  if _identity_cost(r, c, f, t) >= _pullback_cost(r, c, f, t):
    return f"dense, but the weight gradients are cheaper ({r} rows, {c} input features)"
  return None


def any_dense(r, c, f, t):
  return None


def stacked_layout(r, c, f, t):
  """``per_task_value_and_grad``'s choice: the batched product over ``T``
  (which broadcasts the ``R x C`` activation ``T`` times) where that is
  smaller than the ``T x C x F`` transpose it saves."""
  return None if r <= f else "dense, but the plain batched pullback is cheaper here"


def plan(fn: Callable, args: list, num_diff: int, choose: Callable = cheaper_gram) -> Plan:
  """Analyse ``fn(*args)`` (a flat list of outputs, the ``(T,)`` losses
  first) for covered dense uses of its first ``num_diff`` arguments;
  ``choose(R, C, F, T)`` returns None to cover a use, or why not."""
  closed = _inline(jax.make_jaxpr(fn)(*args), args)
  jaxpr = closed.jaxpr
  n = num_diff
  out0 = jaxpr.outvars[0].aval
  num_tasks = out0.shape[0] if len(out0.shape) == 1 else 1
  uses_of: dict = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for pos, v in enumerate(eqn.invars):
      if not isinstance(v, jcore.Literal):
        uses_of.setdefault(v, []).append((i, pos))
  outs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}

  covered, reasons = [], {}
  for k, v in enumerate(jaxpr.invars[:n]):
    reason, chain = None, []
    while True:
      us = uses_of.get(v, [])
      if v in outs:
        reason = "returned by the function"
        break
      if len(us) != 1:
        reason = "unused" if not us else "used more than once"
        break
      i, pos = us[0]
      eqn = jaxpr.eqns[i]
      name = eqn.primitive.name
      if name in _VIEWS:
        v = eqn.outvars[0]
        chain.append(i)
        continue
      if name != "dot_general":
        reason = f"used by {name}"
        break
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      if lb or rb:
        reason = "dot_general with batch dimensions"
        break
      act_pos = 1 - pos
      a_aval = eqn.invars[act_pos].aval
      w_aval = eqn.invars[pos].aval
      a_con = tuple(lc if act_pos == 0 else rc)
      w_con = tuple(rc if act_pos == 0 else lc)
      r = math.prod(d for j, d in enumerate(a_aval.shape) if j not in a_con)
      c = math.prod(a_aval.shape[j] for j in a_con)
      f = math.prod(d for j, d in enumerate(w_aval.shape) if j not in w_con)
      if _explicitly_sharded(a_aval):
        reason = "dense, but its activation is split over an explicit mesh axis"
        break
      reason = choose(r, c, f, num_tasks)
      if reason is not None:
        break
      covered.append(DenseUse(k, i, act_pos, a_con, w_con, tuple(chain), r, c, f))
      reason = "dense"
      break
    reasons[k] = reason
  return Plan(closed, tuple(covered), reasons)


def perturbed_fn(p: Plan, args_after: list) -> Callable:
  """``g(leaves, zs) -> (outputs, activations)``: the analysed function with
  ``zs[j]`` added to the output of covered product ``j``; ``args_after`` are
  the jaxpr's other inputs (not differentiated)."""
  by_eqn: dict = {}
  for j, u in enumerate(p.uses):  # both operands of a product may be covered
    by_eqn.setdefault(u.eqn, []).append(j)

  def g(leaves, zs):
    acts = [None] * len(p.uses)

    def hook(i, invals, outs):
      js = by_eqn.get(i)
      if js is None:
        return outs
      y = outs[0]
      for j in js:
        acts[j] = invals[p.uses[j].act_pos]
        y = y + zs[j]
      return [y]

    outs = evaluate(p.jaxpr.jaxpr, p.jaxpr.consts, [*leaves, *args_after], hook)
    return outs, acts

  return g


def block(use: DenseUse, act: jax.Array, d: jax.Array, acc) -> jax.Array:
  """``(T, T)`` Gram block of one covered product from its activation
  ``act`` and the stacked cotangents ``d`` (``(T, *y.shape)``) of its output:
  ``K[s, t] = <(a a^T) d_s, d_t>``."""
  a2, d2 = _act_rows(use, act, d, acc)
  aa = a2 @ a2.T
  m = jnp.einsum("rq,tqf->trf", aa, d2)
  return jnp.einsum("srf,trf->st", d2, m)


def _act_rows(use: DenseUse, act, d, dtype):
  """The activation as ``(R, C)`` and the output cotangents as ``(T, R, F)``."""
  t = d.shape[0]
  free = [j for j in range(act.ndim) if j not in use.act_contract]
  a2 = jnp.transpose(act, free + list(use.act_contract)).reshape(use.rows, use.cols)
  if use.act_pos == 0:  # y = (a free dims..., W free dims...)
    d2 = d.reshape(t, use.rows, use.feats)
  else:  # y = (W free dims..., a free dims...)
    d2 = jnp.swapaxes(d.reshape(t, use.feats, use.rows), 1, 2)
  return a2.astype(dtype), d2.astype(dtype)


def per_task_grad(p: Plan, use: DenseUse, leaf, act, d):
  """Stacked per-task gradients ``(T, *leaf.shape)`` of a covered leaf:
  ``a^T d_t`` as one batched matrix product over ``T`` (the activation
  broadcast over the task axis, so the product is written in the stacked
  layout: no transpose of the ``T x C x F`` result), then through the
  transposes of the leaf's view chain."""
  eqns = p.jaxpr.jaxpr.eqns
  dot = eqns[use.eqn]
  w_aval = dot.invars[1 - use.act_pos].aval
  t = d.shape[0]
  a2, d2 = _act_rows(use, act, d, d.dtype)
  ab = jnp.broadcast_to(a2, (t, use.rows, use.cols))
  g = jax.lax.dot_general(
    ab, d2, (((1,), (1,)), ((0,), (0,))), preferred_element_type=w_aval.dtype
  )  # (T, C, F)
  w_free = [j for j in range(len(w_aval.shape)) if j not in use.w_contract]
  order = list(use.w_contract) + w_free
  g = g.reshape((t, *[w_aval.shape[j] for j in order]))
  g = jnp.transpose(g, [0] + [1 + order.index(j) for j in range(len(w_aval.shape))])
  if not use.chain:
    return g.astype(leaf.dtype)

  def views(x):
    for i in use.chain:
      e = eqns[i]
      x = e.primitive.bind(x, **e.primitive.get_bind_params(e.params))
    return x

  _, pull = jax.vjp(views, leaf)
  return jax.vmap(lambda gt: pull(gt.astype(w_aval.dtype))[0])(g)
