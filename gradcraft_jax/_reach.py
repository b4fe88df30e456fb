r"""Which task losses each value of a traced loss function can reach.

The lean step's loss function returns ``T`` task losses. Many parameters of
a ranking model reach only one of them: a per-task tower (separate leaves),
a tower stacked with a task axis (a ``(T, H, K)`` leaf used through
``einsum`` or ``vmap``, slice ``t`` reaching only loss ``t``), a per-task
gate. For such a parameter ``g_s = 0`` for every other task ``s``: its
Gram block is zero except the diagonal ``|g_t|^2``, and every ``g_t`` comes
from ONE pullback of the all-ones cotangent, since only loss ``t``
contributes to it.

:func:`reach` is a backward pass over the jaxpr that gives every value one
of

* a set ``S`` of tasks (a ``frozenset``): the value's derivative reaches
  only the losses in ``S`` (the empty set: none);
* :class:`Axis` ``(axis, tasks)``: slice ``i`` of the value along ``axis``
  reaches only loss ``tasks[i]`` (``None``: none).

Every rule is sound for derivatives: an input of an equation reaches at
most what the equation's outputs reach (the set rule, which holds for any
primitive, control flow and custom derivatives included), and the finer
:class:`Axis` rules are stated per primitive (elementwise operations,
reductions over other axes, transposes and reshapes that keep the axis,
broadcasts, ``dot_general`` with the axis as a batch or free dimension,
concatenation, slicing, ...). A ``custom_jvp`` function is followed through
its JVP rule (the tangent path: the derivative is what the rule says it
is). Anything else keeps the set rule.

:func:`split` then cuts the jaxpr into a *trunk* (values that reach several
losses) and a *head* (values that reach one loss per slice: towers, gates,
the loss computations), and lists the *sites* where the head reads trunk
values, with how the cotangent arriving there separates by task:

* ``"task"``: the reading equation's outputs reach one task ``t`` only
  (a separate tower): the cotangent is task ``t``'s.
* ``"axis"``: the reading reaches one task per slice along an axis: the
  cotangent's slice ``i`` is task ``tasks[i]``'s.
* ``"dot"``: a ``dot_general`` whose other operand carries the task axis
  as a free dimension (stacked towers' first layer ``einsum('bh,thk->tbk')``,
  per-task gates over shared experts): task ``t``'s cotangent is the
  pullback of output slice ``t`` with operand slice ``t``, one batched
  product over the tasks.
* ``"broadcast"``: a ``broadcast_in_dim`` that adds the task axis: task
  ``t``'s cotangent is the pullback of output slice ``t``.

A head equation that reads a trunk value any other way, or reads a
parameter (or a view of one) that also reaches other losses, moves to the
trunk, with the head equations its inputs come from: the result is the
same, only the trunk's batched pullback does more. The lean step pulls the
``T`` one-hot cotangents back through the trunk only, starting from the
sites' per-task cotangents, and the head once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from gradcraft_jax import _dense_gram

NONE: frozenset[int] = frozenset()

# Primitives whose output element depends only on the same element of each
# input (inputs of the output's shape, or scalars).
_ELEMENTWISE = frozenset(
  {
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "complex", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh",
    "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge",
    "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt",
    "max", "mesh_cast", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real",
    "reduce_precision", "rem", "reshard", "round", "rsqrt", "select_n", "sharding_constraint",
    "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor",
  }
)  # fmt: skip
_REDUCTIONS = frozenset(
  {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
   "reduce_xor", "argmax", "argmin"}
)  # fmt: skip
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_SHAPE_ONLY = frozenset({"reshape", "squeeze", "expand_dims"})
_MAX_DEPTH = 3  # nesting of custom_jvp rules followed


@dataclasses.dataclass(frozen=True)
class Axis:
  """Slice ``i`` along ``axis`` reaches only loss ``tasks[i]`` (None: no loss)."""

  axis: int
  tasks: tuple


def normal(r):
  """An :class:`Axis` whose slices all reach the same task (or none) as a set."""
  if isinstance(r, Axis) and len(set(r.tasks)) <= 1:
    return frozenset(t for t in r.tasks[:1] if t is not None)
  return r


def tasks_of(r) -> frozenset:
  if isinstance(r, Axis):
    return frozenset(t for t in r.tasks if t is not None)
  return r


def is_local(r) -> bool:
  """Every slice of the value reaches at most one loss."""
  return isinstance(r, Axis) or len(r) <= 1


def join(a, b):
  """What a value reaches through two of its uses."""
  if a == NONE:
    return b
  if b == NONE:
    return a
  if isinstance(a, Axis) and isinstance(b, Axis) and a.axis == b.axis:
    out = []
    for x, y in zip(a.tasks, b.tasks):
      if x is None or x == y:
        out.append(y)
      elif y is None:
        out.append(x)
      else:
        return tasks_of(a) | tasks_of(b)
    return normal(Axis(a.axis, tuple(out)))
  return tasks_of(a) | tasks_of(b)


def as_slices(r, axis: int, n: int):
  """``r`` as a per-slice task tuple along ``axis`` (None if not expressible)."""
  if isinstance(r, Axis):
    return r.tasks if r.axis == axis else None
  if len(r) == 0:
    return (None,) * n
  if len(r) == 1:
    return (next(iter(r)),) * n
  return None


def _shape(v):
  return tuple(getattr(getattr(v, "aval", None), "shape", ()))


def _reshape_rule(ishape, oshape, a, tasks):
  """What the operand of a reshape reaches, its output reaching by axis
  ``a``: an input axis that is output axis ``a`` whole, or ``a`` merged with
  the axes after it (its slice ``k`` is then task ``tasks[k // inner]``), or
  ``a`` split with the axes after it into input axes (the outer one
  carries it when each of its slices covers one task); None otherwise."""
  before = math.prod(oshape[:a])
  for j in range(len(ishape)):
    if math.prod(ishape[:j]) != before:
      continue
    inner = 1
    for r in range(a + 1, len(oshape) + 1):  # ishape[j] = prod(oshape[a:r])
      if ishape[j] == oshape[a] * inner:
        return normal(Axis(j, tuple(tasks[k // inner] for k in range(ishape[j]))))
      if r < len(oshape):
        inner *= oshape[r]
    if oshape[a] % ishape[j] == 0:  # output axis a = input axes j, j+1, ...
      inner = oshape[a] // ishape[j]
      if math.prod(ishape[j + 1 :]) % inner == 0 and _inner_prod_ok(ishape, j, inner):
        groups = [set(tasks[k * inner : (k + 1) * inner]) for k in range(ishape[j])]
        if all(len(g - {None}) <= 1 for g in groups):
          ts = tuple(next(iter(g - {None}), None) for g in groups)
          return normal(Axis(j, ts))
  return None


def _inner_prod_ok(ishape, j, inner):
  """Input axes after ``j`` multiply to ``inner`` over a prefix of them."""
  acc = 1
  for d in ishape[j + 1 :]:
    acc *= d
    if acc == inner:
      return True
    if acc > inner:
      return False
  return inner == 1


def _same_axis(s, oshape, a):
  """An elementwise operand of shape ``s`` carries output axis ``a`` whole."""
  return (
    len(s) == len(oshape) and s[a] == oshape[a] and all(x == y or x == 1 for x, y in zip(s, oshape))
  )


def _dot_operand_axes(eqn, a):
  """``(lhs reach axis, rhs reach axis)`` for output axis ``a`` of a
  dot_general: an int (the operand's dimension carrying it) or None (the
  operand is broadcast along it)."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  nl, nr = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
  lfree = [i for i in range(nl) if i not in lc and i not in lb]
  rfree = [i for i in range(nr) if i not in rc and i not in rb]
  nb = len(lb)
  if a < nb:
    return lb[a], rb[a]
  if a < nb + len(lfree):
    return lfree[a - nb], None
  return None, rfree[a - nb - len(lfree)]


def _backward(eqn, outs, depth):
  """What each input of ``eqn`` reaches, given what its outputs reach."""
  n = len(eqn.invars)
  name = eqn.primitive.name
  union = frozenset().union(*[tasks_of(r) for r in outs])
  if name == "stop_gradient":
    return [NONE] * n
  if name in ("split", "unstack"):
    return _unstack_rule(eqn, outs, union)
  if name == "optimization_barrier" and len(outs) == n:
    return list(outs)
  if name == "slice" and not isinstance(outs[0], Axis):
    return [_slice_of_set(eqn, outs[0])] + [union] * (n - 1)
  if all(not isinstance(r, Axis) for r in outs):
    return [union] * n
  if name == "custom_jvp_call" and depth < _MAX_DEPTH:
    return _custom_jvp(eqn, outs, depth)
  sub = None
  if name in _dense_gram._INLINE or name == "checkpoint":
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if sub is not None:
    body = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
    if len(body.invars) == n:
      env, _ = reach_jaxpr(body, outs, depth)
      return [env.get(v, NONE) for v in body.invars]
  if len(outs) != 1:
    return [union] * n
  r = outs[0]
  a, tasks = r.axis, r.tasks
  oshape = _shape(eqn.outvars[0])
  shapes = [_shape(v) for v in eqn.invars]
  p = eqn.params

  def ax(j, ts=tasks):
    return normal(Axis(j, tuple(ts)))

  res = [union] * n
  if name in _ELEMENTWISE:  # operands of the output's shape, size-1 broadcast, or scalars
    return [ax(a) if _same_axis(s, oshape, a) else union for s in shapes]
  if name in _REDUCTIONS:
    kept = [i for i in range(len(shapes[0])) if i not in p["axes"]]
    res[0] = ax(kept[a])
  elif name in _CUMULATIVE:
    if p["axis"] != a:
      res[0] = ax(a)
  elif name == "broadcast_in_dim":
    bd = p["broadcast_dimensions"]
    if a in bd and shapes[0][bd.index(a)] == oshape[a]:
      res[0] = ax(bd.index(a))
  elif name == "transpose":
    res[0] = ax(p["permutation"][a])
  elif name in _SHAPE_ONLY:
    r = _reshape_rule(shapes[0], oshape, a, tasks)
    if r is not None:
      res[0] = r
  elif name == "dot_general":
    for k, j in enumerate(_dot_operand_axes(eqn, a)):
      if j is not None:
        res[k] = ax(j)
  elif name == "stack":
    d = p["axis"]
    res = [normal(frozenset(() if tasks[k] is None else (tasks[k],))) for k in range(n)]
    res = res if d == a else [ax(a - (a > d))] * n
  elif name == "concatenate":
    d = p["dimension"]
    off = 0
    for k, s in enumerate(shapes):
      res[k] = ax(a) if d != a else ax(a, tasks[off : off + s[a]])
      off += s[a] if d == a else 0
  elif name == "slice":
    start, limit = p["start_indices"][a], p["limit_indices"][a]
    stride = (p["strides"] or (1,) * len(oshape))[a]
    ts = [None] * shapes[0][a]
    for i in range(start, min(limit, shapes[0][a]), stride):
      ts[i] = tasks[(i - start) // stride]
    res[0] = ax(a, ts)
  elif name == "pad":
    lo, hi, interior = p["padding_config"][a]
    if interior == 0 and lo >= 0 and hi >= 0:
      res[0] = ax(a, tasks[lo : lo + shapes[0][a]])
  elif name == "rev":
    res[0] = ax(a, tasks[::-1] if a in p["dimensions"] else tasks)
  elif name == "dynamic_slice":
    if shapes[0][a] == oshape[a]:
      res[0] = ax(a)
  elif name == "dynamic_update_slice":
    if shapes[0][a] == oshape[a] == shapes[1][a]:
      res[0], res[1] = ax(a), ax(a)
  return res


def _slice_of_set(eqn, r):
  """A static slice along one axis whose output reaches one set: the
  operand's slices outside it reach nothing through this use."""
  ishape, p = _shape(eqn.invars[0]), eqn.params
  oshape = _shape(eqn.outvars[0])
  cut = [j for j in range(len(ishape)) if oshape[j] != ishape[j]]
  if len(cut) != 1 or len(r) != 1:
    return r
  (a,) = cut
  (t,) = tuple(r)
  start, limit = p["start_indices"][a], p["limit_indices"][a]
  stride = (p["strides"] or (1,) * len(ishape))[a]
  ts = [t if start <= i < limit and (i - start) % stride == 0 else None for i in range(ishape[a])]
  return normal(Axis(a, tuple(ts)))


def _unstack_rule(eqn, outs, union):
  """``split`` / ``unstack`` along ``axis``: the operand's slices along it
  are the outputs' (or every output reaches by the same other axis)."""
  axis = eqn.params["axis"]
  n = len(eqn.invars)
  ts: list[int | None] = []
  for v, r in zip(eqn.outvars, outs):
    if eqn.primitive.name == "unstack":
      s = (next(iter(r)),) if isinstance(r, frozenset) and len(r) == 1 else None
      s = (None,) if r == NONE else s
    else:
      s = as_slices(r, axis, _shape(v)[axis])
    if s is None:
      break
    ts.extend(s)
  else:
    return [normal(Axis(axis, tuple(ts)))] + [union] * (n - 1)
  first = outs[0]
  if isinstance(first, Axis) and all(r == first for r in outs):
    a = first.axis
    if eqn.primitive.name == "unstack":
      a += a >= axis
    elif a == axis:
      return [union] * n
    return [normal(Axis(a, first.tasks))] + [union] * (n - 1)
  return [union] * n


def _bind(eqn, invals):
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(outs) if eqn.primitive.multiple_results else [outs]


def _custom_jvp(eqn, outs, depth):
  """Follow a ``custom_jvp`` function through its JVP rule: an input
  reaches what the tangent outputs its tangent flows into reach."""
  n = len(eqn.invars)
  union = frozenset().union(*[tasks_of(r) for r in outs])
  avals = [v.aval for v in eqn.invars]
  flt = [i for i, av in enumerate(avals) if jnp.issubdtype(av.dtype, jnp.inexact)]
  structs = [jax.ShapeDtypeStruct(av.shape, av.dtype) for av in avals]

  def jvp(prims, tans):
    def f(*fl):
      xs = list(prims)
      for i, x in zip(flt, fl):
        xs[i] = x
      return _bind(eqn, xs)

    return jax.jvp(f, [prims[i] for i in flt], list(tans))

  try:
    closed = jax.make_jaxpr(jvp)(structs, [structs[i] for i in flt])
  except Exception:  # pylint: disable=broad-except
    return [union] * n
  body = closed.jaxpr
  m = len(eqn.outvars)
  if len(body.outvars) != 2 * m or len(body.invars) != n + len(flt):
    return [union] * n
  env, _ = reach_jaxpr(body, [NONE] * m + list(outs), depth + 1)
  res = [NONE] * n
  for i, v in zip(flt, body.invars[n:]):
    res[i] = env.get(v, NONE)
  return res


def reach_jaxpr(jaxpr, out_reach, depth=0):
  """``(reach, contrib)``: what every value of ``jaxpr`` reaches, given what
  its outputs reach; ``contrib[(i, p)]`` is what input ``p`` of equation
  ``i`` reaches through that use alone."""
  env: dict = {}
  contrib: dict = {}
  for v, r in zip(jaxpr.outvars, out_reach):
    if not isinstance(v, jcore.Literal):
      env[v] = join(env.get(v, NONE), r)
  for i in range(len(jaxpr.eqns) - 1, -1, -1):
    eqn = jaxpr.eqns[i]
    outs = [NONE if isinstance(v, jcore.DropVar) else env.get(v, NONE) for v in eqn.outvars]
    if all(r == NONE for r in outs):
      ins = [NONE] * len(eqn.invars)
    else:
      ins = _backward(eqn, outs, depth)
    for p, (v, r) in enumerate(zip(eqn.invars, ins)):
      if isinstance(v, jcore.Literal):
        continue
      r = normal(r)
      contrib[(i, p)] = r
      env[v] = join(env.get(v, NONE), r)
  return env, contrib


@dataclasses.dataclass(frozen=True)
class Site:
  """Where the head reads a trunk value (``Split.bvars[var]``)."""

  var: int
  eqn: int  # -1: the losses output itself
  pos: int
  kind: str  # "task", "axis", "dot", "broadcast" or "elementwise"
  task: Any = None  # "task": the task (None: no task)
  axis: int = 0  # "axis": of the value; "dot"/"broadcast": of the equation's output
  tasks: tuple = ()  # per slice along ``axis``
  other_axis: int = 0  # "dot": dimension of the other operand carrying the axis


@dataclasses.dataclass(frozen=True)
class Split:
  head: tuple  # equation indices evaluated in the head (in order)
  trunk: tuple  # the others
  head_leaves: tuple  # differentiated leaves read only by the head
  leaf_reach: tuple  # what each differentiated leaf reaches
  bvars: tuple  # trunk values the head differentiates through
  sites: tuple  # Site
  head_reads: tuple  # trunk values the head reads (constants there)


def split(jaxpr, num_diff: int, num_tasks: int, trunk_leaves=(), no_sites=()) -> Split:
  """Cut ``jaxpr`` (outputs: the ``(T,)`` losses, then aux) into trunk and
  head; an empty head when no differentiated leaf reaches a single task.
  The leaves ``trunk_leaves`` (indices) stay in the trunk with all their
  uses; the head reads no leaf of ``no_sites`` (their uses stay in the
  trunk, with the routes that cover them there)."""
  eqns = jaxpr.eqns
  leaves = list(jaxpr.invars[:num_diff])
  out0 = jaxpr.outvars[0]
  top = normal(Axis(0, tuple(range(num_tasks))))
  reach, contrib = reach_jaxpr(jaxpr, [top] + [NONE] * (len(jaxpr.outvars) - 1))

  dep, param = set(leaves), set(leaves)
  producer: dict[Any, int] = {}
  consumers: dict[Any, list[tuple[int, int]]] = {}
  for i, e in enumerate(eqns):
    ins = [v for v in e.invars if not isinstance(v, jcore.Literal)]
    outs = [v for v in e.outvars if not isinstance(v, jcore.DropVar)]
    if any(v in dep for v in ins):
      dep.update(outs)
    if e.primitive.name in _dense_gram._VIEWS and ins and ins[0] in param:
      param.update(outs)
    for v in outs:
      producer[v] = i
    for p, v in enumerate(e.invars):
      if not isinstance(v, jcore.Literal):
        consumers.setdefault(v, []).append((i, p))

  forced = {leaves[k] for k in trunk_leaves}
  pinned = forced | {leaves[k] for k in no_sites}

  def diff(v):  # a value with a derivative (integer values are constants)
    return v in dep and jnp.issubdtype(v.aval.dtype, jnp.inexact)

  def local(v):
    return v not in forced and is_local(reach.get(v, NONE))

  head = {
    i
    for i, e in enumerate(eqns)
    if any(v in dep for v in e.outvars) and all(local(v) for v in e.outvars if v in dep)
  }

  def kind(i, p, v):
    """How the cotangent of site (i, p) separates by task, or None."""
    r = reach.get(v, NONE)
    c = r if is_local(r) else contrib.get((i, p), r)
    if isinstance(c, Axis):
      return dict(kind="axis", axis=c.axis, tasks=c.tasks)
    if len(c) <= 1:
      return dict(kind="task", task=next(iter(c), None))
    e = eqns[i]
    if len(e.outvars) != 1:
      return None
    ro = reach.get(e.outvars[0], NONE)
    if not isinstance(ro, Axis):
      return None
    a, name = ro.axis, e.primitive.name
    oshape = _shape(e.outvars[0])
    if name == "dot_general":
      axes = _dot_operand_axes(e, a)
      if axes[p] is None and axes[1 - p] is not None:
        return dict(kind="dot", axis=a, tasks=ro.tasks, other_axis=axes[1 - p])
    if name == "broadcast_in_dim" and p == 0:
      return dict(kind="broadcast", axis=a, tasks=ro.tasks)
    s = _shape(v)
    if name in _ELEMENTWISE and (not s or (len(s) == len(oshape) and s[a] == 1)):
      return dict(kind="elementwise", axis=a, tasks=ro.tasks)
    return None

  def site_ok(i, p, v):
    """The head may read trunk value (or trunk leaf) ``v`` at (i, p)."""
    if v in param:  # no parameter-sized cotangents T times, no covered leaf's use
      size = math.prod(_shape(v))
      if v in pinned or any(size > math.prod(_shape(o)) for o in eqns[i].outvars):
        return False
    return kind(i, p, v) is not None

  def head_leaf(v):
    us = consumers.get(v, [])
    return local(v) and us and all(i in head for i, _ in us)

  changed = True
  while changed:
    changed = False
    for i, e in enumerate(eqns):  # the trunk reads no head value
      if i not in head:
        for v in e.invars:
          if not isinstance(v, jcore.Literal) and producer.get(v) in head:
            head.discard(producer[v])
            changed = True
    for i in sorted(head):  # the head reads trunk values at sites only
      for p, v in enumerate(eqns[i].invars):
        if isinstance(v, jcore.Literal) or not diff(v) or producer.get(v) in head:
          continue
        if v in producer or not head_leaf(v):
          if not site_ok(i, p, v):
            head.discard(i)
            changed = True
            break

  head_leaves = [k for k, v in enumerate(leaves) if head_leaf(v)]
  if not any(reach.get(leaves[k], NONE) != NONE for k in head_leaves):
    head, head_leaves = set(), []
  hl = {leaves[k] for k in head_leaves}

  bvars, sites, reads = [], [], []

  def var_index(v):
    if v not in bvars:
      bvars.append(v)
    return bvars.index(v)

  for i in sorted(head):
    for p, v in enumerate(eqns[i].invars):
      if isinstance(v, jcore.Literal) or producer.get(v) in head or v in hl:
        continue
      if v in producer and v not in reads:
        reads.append(v)
      if not diff(v):
        continue
      k = kind(i, p, v)
      if k["kind"] == "task" and k["task"] is None:
        continue  # reaches no loss through this use: a constant there
      sites.append(Site(var=var_index(v), eqn=i, pos=p, **k))
  for v in jaxpr.outvars:
    if not isinstance(v, jcore.Literal) and v in producer and producer[v] not in head:
      if v not in reads:
        reads.append(v)
  if not isinstance(out0, jcore.Literal) and diff(out0) and producer.get(out0) not in head:
    if out0 not in hl:
      k = as_slices(reach.get(out0, NONE), 0, num_tasks) or tuple(range(num_tasks))
      sites.append(Site(var=var_index(out0), eqn=-1, pos=0, kind="axis", axis=0, tasks=k))
  return Split(
    head=tuple(sorted(head)),
    trunk=tuple(i for i in range(len(eqns)) if i not in head),
    head_leaves=tuple(head_leaves),
    leaf_reach=tuple(reach.get(v, NONE) for v in leaves),
    bvars=tuple(bvars),
    sites=tuple(sites),
    head_reads=tuple(reads),
  )
