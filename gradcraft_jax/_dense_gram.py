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
per-task pullback. The identity is an equality, applied only where its
premise (a single dense use of a real floating-point weight in a real
floating-point product) holds; in floating point it is evaluated with the
activation centred (:func:`block`), so its rounding error is of the order of
the per-task pullback's, not of the activation's squared offset.

The analysis is one guarded unit: :func:`analyse` (tracing and planning) and
:func:`build` (the perturbed function, its VJP and the blocks' shapes) raise
:class:`Fallback` with a reason when the fast route cannot be taken, and the
callers then take their plain route as a whole and report the reason
(``on_fallback``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Primitives through which a parameter's per-task gradient is a permuted (or
# re-typed) copy of the gradient of the primitive's output: inner products
# are preserved (up to the rounding of a cast).
# (``convert_element_type`` is a view only between real floating dtypes: see
# ``_float_cast``.)
_VIEWS = frozenset(
  {
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reshard",
    "sharding_constraint",
    "mesh_cast",
  }
)
# Call primitives whose body is inlined before the analysis (a jit call only
# without settings of its own: see ``_kept_jit``).
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
# A custom VJP rule: the library cannot know that it is linear in the
# cotangent, so the lean step never pulls a weighted sum of cotangents through
# it (see ``custom_vjps``).
_CUSTOM_VJP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
_ON_FALLBACK = ("warn", "silent", "raise")


class FallbackWarning(UserWarning):
  """A fast route of :func:`~gradcraft_jax.per_task_value_and_grad` or
  :func:`~gradcraft_jax.combined_value_and_grad` could not be taken, and the
  step took its plain route instead (same result, more time or memory).

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> def fun(w, x):
    ...   scale = float(x[0])  # reads a concrete value: no abstract trace
    ...   return jnp.stack([scale * jnp.sum(w), jnp.sum(w ** 2)])
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = gj.per_task_value_and_grad(fun)(jnp.ones(2), jnp.ones(3))
    >>> any(issubclass(c.category, gj.FallbackWarning) for c in caught)
    True
  """


class Fallback(Exception):
  """The fast route cannot be taken; ``reason`` says why."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class LossVectorError(ValueError):
  """``fun`` does not return a vector of real task losses (the user's
  error: raised on every route, never a fallback)."""


def check_on_fallback(on_fallback: str) -> None:
  if on_fallback not in _ON_FALLBACK:
    raise ValueError(f"on_fallback must be one of {_ON_FALLBACK}, got {on_fallback!r}")


def report(on_fallback: str, caller: str, reason: str, cause: BaseException | None = None):
  """Tell the user that the step left its fast route (``on_fallback``:
  ``"warn"`` a :class:`FallbackWarning`, ``"raise"`` a ``RuntimeError``,
  ``"silent"`` nothing). At trace time, so once per compilation under jit."""
  msg = f"{caller}: {reason}"
  if on_fallback == "raise":
    raise RuntimeError(msg + " (on_fallback='raise')") from cause
  if on_fallback == "warn":
    warnings.warn(msg + " (on_fallback='silent' hides this warning)", FallbackWarning, stacklevel=3)


def _describe(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def guarded(stage: str):
  """Any exception of ``stage`` becomes a :class:`Fallback` naming it (the
  user's own :class:`LossVectorError` passes through)."""
  try:
    yield
  except (Fallback, LossVectorError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise Fallback(f"{stage} failed ({_describe(e)})") from e


def _is_float(dtype) -> bool:
  """Real floating point (not integer, bool, complex or float0)."""
  return jnp.issubdtype(dtype, jnp.floating)


def _float_cast(eqn) -> bool:
  """Whether a ``convert_element_type`` is a view for the analysis: from a
  real floating dtype to a real floating dtype. A cast to an integer or bool
  dtype cuts the gradient (its true gradient is zero), a cast to complex
  changes the inner product."""
  return _is_float(eqn.invars[0].aval.dtype) and _is_float(eqn.outvars[0].aval.dtype)


def _kept_jit(eqn) -> str | None:
  """What a ``jax.jit`` call sets that inlining would drop (shardings,
  layouts, donation, compiler options), or None. Such a call is kept as it
  is, and the leaves that enter it keep their per-task pullbacks."""
  if eqn.primitive.name not in ("jit", "pjit"):
    return None
  p = eqn.params
  shardings = (*p.get("in_shardings", ()), *p.get("out_shardings", ()))
  kept = []
  if any(type(s).__name__ != "UnspecifiedValue" for s in shardings):
    kept.append("shardings")
  if any(x is not None for x in (*p.get("in_layouts", ()), *p.get("out_layouts", ()))):
    kept.append("layouts")
  if any(p.get("donated_invars", ())):
    kept.append("donation")
  if p.get("compiler_options_kvs"):
    kept.append("compiler options")
  return ", ".join(kept) or None


def _inlinable(eqn) -> bool:
  return eqn.primitive.name in _INLINE and _kept_jit(eqn) is None


def _sub_jaxprs(params):
  """The jaxprs among an equation's parameters (scan, cond branches, while,
  remat, jit, custom_jvp, shard_map, ...)."""
  for value in params.values():
    for x in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _custom_vjp_name(eqn) -> str:
  name = eqn.params.get("name")
  if not name:
    sub = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    info = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
    name = getattr(info, "func_name", None) or "custom_vjp"
  return str(name).split(" ")[0]


def _all_custom_vjps(jaxpr, found: list) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _CUSTOM_VJP:
      found.append(_custom_vjp_name(eqn))
    for sub in _sub_jaxprs(eqn.params):
      _all_custom_vjps(sub, found)


def custom_vjps(jaxpr, num_diff: int) -> tuple:
  """Names of the ``jax.custom_vjp`` functions that the first ``num_diff``
  inputs of ``jaxpr`` reach (at any depth: inside jit, scan, cond, while,
  remat, custom_jvp, ...; conservatively, a call reached by a differentiated
  input counts with every custom VJP in its body). ``jax.custom_jvp`` is not
  listed: its transpose is derived by JAX, so it is linear."""
  tainted = set(jaxpr.invars[:num_diff])
  found: list = []
  for eqn in jaxpr.eqns:
    if not any(not isinstance(v, jcore.Literal) and v in tainted for v in eqn.invars):
      continue
    tainted.update(eqn.outvars)
    if eqn.primitive.name in _CUSTOM_VJP:
      found.append(_custom_vjp_name(eqn))
    for sub in _sub_jaxprs(eqn.params):
      _all_custom_vjps(sub, found)
  return tuple(dict.fromkeys(found))


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
  custom_vjps: tuple = ()  # custom_vjp functions the differentiated leaves reach


def check_loss_vector(losses, caller: str) -> None:
  """The loss function's output must be the ``(T,)`` vector of real
  floating-point task losses."""
  if jnp.ndim(losses) != 1:
    raise LossVectorError(
      f"{caller}: fun must return a 1-D vector of task losses, got shape {jnp.shape(losses)}"
    )
  if not _is_float(jnp.result_type(losses)):
    raise LossVectorError(
      f"{caller}: fun must return real floating-point task losses, got "
      f"dtype {jnp.result_type(losses)}"
    )


def check_real_leaves(tree, caller: str) -> None:
  """Complex parameters are refused (the Gram matrix of the library is the
  real inner product of real gradients), naming the leaf."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise TypeError(
        f"{caller}: parameter leaf {jax.tree_util.keystr(path) or '<root>'} is complex "
        f"({jnp.result_type(leaf)}); gradcraft-jax supports real parameters only (store a "
        "complex parameter as its real and imaginary parts)"
      )


def chooser(gram: str) -> Callable | None:
  """The ``plan`` choice for a ``gram`` mode of the lean step (None for
  ``"pullback"``: nothing covered)."""
  return {"dense": any_dense, "auto": cheaper_gram}.get(gram)


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
    diff, self.diff_tree = jax.tree_util.tree_flatten(primals)
    # Python and NumPy scalars become arrays, as jax.vjp makes them.
    self.diff = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in diff]
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


def analyse(
  fun, full_args, nums, has_aux, choose: Callable | None, caller="combined_value_and_grad"
):
  """``(flat, plan)``: ``fun`` traced with abstract arguments and analysed
  (``choose`` None: nothing covered, the trace only lists the custom VJPs).
  Raises :class:`Fallback` when ``fun`` cannot be traced that way (it reads
  a concrete value of an argument, ...) or the analysis fails;
  :class:`LossVectorError` when ``fun`` does not return a vector of losses."""
  flat = Flat(fun, full_args, nums, has_aux, caller)
  args = [*flat.diff, *flat.arrays]
  with guarded("tracing fun with abstract arguments"):
    closed = jax.make_jaxpr(flat)(*args)
  with guarded("the analysis of fun"):
    if choose is None:
      reasons = dict.fromkeys(range(len(flat.diff)), "per-task pullback")
      p = Plan(closed, (), reasons, custom_vjps(closed.jaxpr, len(flat.diff)))
    else:
      p = plan(flat, args, len(flat.diff), choose, closed=closed)
  return flat, p


def build(flat: Flat, p: Plan, leaves, arrays, check: Callable | None = None):
  """``flat``'s forward pass with zero perturbations on the covered dense
  outputs: ``(losses, aux_leaves, vjp_fn, acts)``, where ``vjp_fn(cotangent
  of the losses) -> (leaf cotangents, perturbation cotangents)``. With no
  covered use it is the plain pullback of the traced function (``fun`` is
  traced once either way). ``check(acts, ds)``, if given, is traced (never
  run) on the stacked perturbation cotangents ``ds``: the caller's blocks.
  Raises :class:`Fallback` if any of it fails."""
  with guarded("the perturbed forward pass"):
    g = perturbed_fn(p, list(arrays))
    eqns = p.jaxpr.jaxpr.eqns
    zs = []
    for u in p.uses:
      aval = eqns[u.eqn].outvars[0].aval
      zs.append(jnp.zeros(aval.shape, aval.dtype))

    def h(leaves, zs):
      outs, acts = g(leaves, zs)
      return outs[0], (outs[1:], acts)

    losses, vjp_fn, (aux_leaves, acts) = jax.vjp(h, list(leaves), zs, has_aux=True)
  if check is not None:
    with guarded("the dense-layer blocks"):
      t = losses.shape[0]
      ds = [jax.ShapeDtypeStruct((t, *z.shape), z.dtype) for z in zs]
      jax.eval_shape(check, acts, ds)
  return losses, aux_leaves, vjp_fn, acts


def dense_vjp(fun, full_args, nums, has_aux, choose, caller="combined_value_and_grad", check=None):
  """:func:`analyse` then :func:`build`: ``(flat, plan, losses, aux_leaves,
  vjp_fn, acts)``. Raises :class:`Fallback` when the fast route cannot be
  taken; the caller then takes its plain route as a whole (which raises the
  user's own error, if that was the cause)."""
  flat, p = analyse(fun, full_args, nums, has_aux, choose, caller)
  losses, aux_leaves, vjp_fn, acts = build(flat, p, flat.diff, flat.arrays, check)
  return flat, p, losses, aux_leaves, vjp_fn, acts


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
  """Bind ``eqn``'s primitive to ``invals`` as ``jax.core.eval_jaxpr`` does.
  ``get_bind_params`` and ``eqn.ctx`` are JAX internals: both of their forms
  are accepted (``get_bind_params`` returning the parameters, or
  ``(subfuns, parameters)`` in older JAX), and a JAX without them binds the
  plain parameters outside any equation context."""
  prim = eqn.primitive
  get = getattr(prim, "get_bind_params", None)
  params = get(eqn.params) if get is not None else eqn.params
  subfuns = ()
  if isinstance(params, tuple):
    subfuns, params = params
  manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  with manager if manager is not None else contextlib.nullcontext():
    return prim.bind(*subfuns, *invals, **params)


def evaluate(jaxpr, consts, args, hook=None):
  """Evaluate ``jaxpr``; ``hook(i, invals, outvals) -> outvals`` per equation
  of the top level (call primitives of ``_INLINE`` without settings of their
  own are evaluated inline only when ``hook`` is None, i.e. while
  inlining)."""
  env = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [_read(env, v) for v in eqn.invars]
    if hook is None and _inlinable(eqn):
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(sub, jcore.ClosedJaxpr):
        outs = evaluate(sub.jaxpr, sub.consts, invals)
      else:
        outs = evaluate(sub, (), invals)
    else:
      outs = _bind(eqn, invals)
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
    if not any(_inlinable(e) for e in closed.jaxpr.eqns):
      return closed
    closed = jax.make_jaxpr(lambda *a, c=closed: evaluate(c.jaxpr, c.consts, a))(*args)
  return closed


def _explicitly_sharded(aval) -> bool:
  """Whether ``aval`` is split over an explicit mesh axis (then ``a a^T``
  would need the whole activation on every device: the weight gradients,
  reduced locally and all-reduced, are the better route)."""
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if (
    sharding is None
    or mesh is None
    or getattr(mesh, "empty", True)
    or not getattr(mesh, "explicit_axes", ())
  ):
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


def plan(
  fn: Callable, args: list, num_diff: int, choose: Callable = cheaper_gram, closed=None
) -> Plan:
  """Analyse ``fn(*args)`` (a flat list of outputs, the ``(T,)`` losses
  first) for covered dense uses of its first ``num_diff`` arguments;
  ``choose(R, C, F, T)`` returns None to cover a use, or why not.
  ``closed``: ``fn``'s jaxpr at ``args``, if already traced."""
  if closed is None:
    closed = jax.make_jaxpr(fn)(*args)
  closed = _inline(closed, args)
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
    if not _is_float(v.aval.dtype):
      reasons[k] = f"{v.aval.dtype} leaf (not real floating point)"
      continue
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
      if name in _VIEWS or (name == "convert_element_type" and _float_cast(eqn)):
        v = eqn.outvars[0]
        chain.append(i)
        continue
      if name == "convert_element_type":
        reason = f"cast to {eqn.outvars[0].aval.dtype}"
        break
      kept = _kept_jit(eqn)
      if kept is not None:
        reason = f"used by a jax.jit call with its own {kept} (not inlined)"
        break
      if name != "dot_general":
        reason = f"used by {name}"
        break
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      if lb or rb:
        reason = "dot_general with batch dimensions"
        break
      dtypes = [x.aval.dtype for x in (*eqn.invars, *eqn.outvars)]
      if not all(_is_float(dt) for dt in dtypes):
        reason = f"dot_general of {' x '.join(map(str, dtypes[:2]))} (not real floating point)"
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
  return Plan(closed, tuple(covered), reasons, custom_vjps(jaxpr, n))


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


_HIGHEST = jax.lax.Precision.HIGHEST


def block(use: DenseUse, act: jax.Array, d: jax.Array, acc) -> jax.Array:
  r"""``(T, T)`` Gram block of one covered product from its activation
  ``act`` and the stacked cotangents ``d`` (``(T, *y.shape)``) of its output:
  ``K[s, t] = <a^T d_s, a^T d_t> = <(a a^T) d_s, d_t>``.

  Evaluated stably: with ``mu`` the mean of the ``R`` rows of the ``(R, C)``
  activation, ``a = 1 mu^T + a~``, ``c_t = 1^T d_t`` and ``e_t = (a~ mu)^T
  d_t`` (``F``-vectors), ``a^T d_t = a~^T d_t + mu c_t^T`` and

  .. math:: K_{st} = \langle (\tilde a \tilde a^\top) d_s, d_t\rangle
     + e_s \cdot c_t + e_t \cdot c_s + \lVert\mu\rVert^2\, c_s \cdot c_t .

  Uncentred, ``a a^T`` carries the offset squared, and a block whose
  cotangents nearly sum to zero over the rows (a normalisation after the
  layer) is a difference of such terms; centred, no term is larger than the
  per-task gradients' own products. ``c_t`` and ``e_t`` come out of the
  same product as ``(a~ a~^T) d_t`` (two more rows, ``1^T`` and ``(a~
  mu)^T``, under ``a~ a~^T``), so the extra cost is ``O(R C + T R F + T^2
  F)`` with no extra pass over the cotangents. Products at ``HIGHEST``
  precision in ``acc`` (at least float32), as
  :func:`~gradcraft_jax.gram_matrix` forms the other blocks."""
  a2, d2 = _act_rows(use, act, d, acc)
  r = a2.shape[0]
  mu = jnp.mean(a2, axis=0)  # (C,)
  ac = a2 - mu
  rows = jnp.concatenate(
    [
      jnp.matmul(ac, ac.T, precision=_HIGHEST),  # (R, R)
      jnp.ones((1, r), acc),
      jnp.matmul(ac, mu, precision=_HIGHEST)[None],
    ]
  )  # (R + 2, R)
  m = jnp.einsum("rq,tqf->trf", rows, d2, precision=_HIGHEST)  # (T, R + 2, F)
  k = jnp.einsum("srf,trf->st", d2, m[:, :r], precision=_HIGHEST)
  c, e = m[:, r], m[:, r + 1]  # (T, F) each
  ec = jnp.matmul(e, c.T, precision=_HIGHEST)  # ec[s, t] = e_s . c_t
  cc = jnp.matmul(c, c.T, precision=_HIGHEST)
  return k + ec + ec.T + jnp.dot(mu, mu, precision=_HIGHEST) * cc


def _act_rows(use: DenseUse, act, d, dtype=None):
  """The activation as ``(R, C)`` and the output cotangents as ``(T, R, F)``
  (cast to ``dtype`` if given)."""
  t = d.shape[0]
  free = [j for j in range(act.ndim) if j not in use.act_contract]
  a2 = jnp.transpose(act, free + list(use.act_contract)).reshape(use.rows, use.cols)
  if use.act_pos == 0:  # y = (a free dims..., W free dims...)
    d2 = d.reshape(t, use.rows, use.feats)
  else:  # y = (W free dims..., a free dims...)
    d2 = jnp.swapaxes(d.reshape(t, use.feats, use.rows), 1, 2)
  if dtype is None:
    return a2, d2
  return a2.astype(dtype), d2.astype(dtype)


def per_task_grad(p: Plan, use: DenseUse, leaf, act, d):
  """Stacked per-task gradients ``(T, *leaf.shape)`` of a covered leaf:
  ``a^T d_t`` as one batched matrix product over ``T`` (the activation
  broadcast over the task axis, so the product is written in the stacked
  layout: no transpose of the ``T x C x F`` result), with the product's own
  ``precision`` and ``preferred_element_type`` (as JAX's transpose of the
  product computes the weight gradient), then through the transposes of the
  leaf's view chain."""
  eqns = p.jaxpr.jaxpr.eqns
  dot = eqns[use.eqn]
  w_aval = dot.invars[1 - use.act_pos].aval
  t = d.shape[0]
  a2, d2 = _act_rows(use, act, d)
  ab = jnp.broadcast_to(a2, (t, use.rows, use.cols))
  g = jax.lax.dot_general(
    ab,
    d2,
    (((1,), (1,)), ((0,), (0,))),
    precision=dot.params.get("precision"),
    preferred_element_type=dot.params.get("preferred_element_type"),
  )  # (T, C, F)
  g = g.astype(w_aval.dtype)
  w_free = [j for j in range(len(w_aval.shape)) if j not in use.w_contract]
  order = list(use.w_contract) + w_free
  g = g.reshape((t, *[w_aval.shape[j] for j in order]))
  g = jnp.transpose(g, [0] + [1 + order.index(j) for j in range(len(w_aval.shape))])
  if not use.chain:
    return g.astype(leaf.dtype)

  def views(x):
    for i in use.chain:
      x = _bind(eqns[i], [x])
    return x

  _, pull = jax.vjp(views, leaf)
  return jax.vmap(lambda gt: pull(gt)[0])(g)
