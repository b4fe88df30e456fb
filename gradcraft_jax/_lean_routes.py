r"""The lean step's Gram routes, and the forward and backward passes they need.

:func:`analyse` decides, for every differentiated leaf of a traced loss
function, where its ``(T, T)`` Gram block comes from:

* ``"task-local (tower)"`` / ``"task-local (stacked towers)"``: the leaf
  (or each slice of it along a task axis) reaches one task loss only
  (:mod:`gradcraft_jax._reach`): its block is diagonal, ``|g_t|^2``, and
  every ``g_t`` comes from one pullback of the all-ones cotangent through
  the *head* (the part of the function whose values reach one loss each).
* ``"dense"``: one dense product, the identity
  :math:`\langle (a a^\top) d_s, d_t\rangle` (:mod:`gradcraft_jax._dense_gram`).
* ``"dense (batched)"``: one ``dot_general`` with batch dimensions (stacked
  experts ``einsum('ebd,edh->ebh')``): ``E`` independent dense products,
  the identity per batch index, summed.
* ``"embedding"``: row lookups of a table: per-id sums of the lookups'
  cotangents (:mod:`gradcraft_jax._embedding_gram`).
* any other reason: the leaf's own ``T`` per-task gradients from the
  batched pullback, reduced to its block.

:func:`lean_vjp` then runs the function forward once, split in two: the
*trunk* with zero perturbations on the covered products' and lookups'
outputs (their cotangents are the ``d_t``), and the head, which reads the
trunk's values at the *sites* of the split. The Gram pass pulls the
all-ones cotangent back through the head once (the task-local leaves'
gradients, and the sites' cotangents, which separate by task), then the
``T`` per-task cotangents of the sites back through the trunk alone
(batched with ``jax.vmap``): the head's equations (towers, gates, losses)
are never pulled back ``T`` times. The weighted pass reuses the head's
pullback (it is linear in the cotangent, and each head value carries one
task per slice) and pulls the trunk back once. Every route is an equality.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from gradcraft_jax import _dense_gram, _embedding_gram, _reach
from gradcraft_jax._stacked import gram_matrix


@dataclasses.dataclass(frozen=True)
class BatchedUse:
  """A covered ``dot_general`` with batch dimensions: ``use`` describes one
  batch index (activation dimensions renumbered without the batch ones)."""

  leaf: int
  eqn: int
  act_pos: int
  act_batch: tuple  # batch dimensions of the activation, in the output's order
  nbatch: int
  use: Any  # _dense_gram.DenseUse


@dataclasses.dataclass(frozen=True)
class Routes:
  jaxpr: Any  # ClosedJaxpr, jit calls inlined
  num_tasks: int
  dense: tuple  # DenseUse (trunk leaves only)
  batched: tuple  # BatchedUse
  tables: tuple  # _embedding_gram.TableUse
  split: _reach.Split
  reasons: dict  # leaf index -> route or why the per-task pullback


def _uses(jaxpr):
  uses_of: dict = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for pos, v in enumerate(eqn.invars):
      if not isinstance(v, jcore.Literal):
        uses_of.setdefault(v, []).append((i, pos))
  outs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  return uses_of, outs


def _batched(jaxpr, leaf, uses_of, outs, num_tasks, choose):
  """``(BatchedUse, None)`` for a leaf whose only use (through views) is one
  ``dot_general`` with batch dimensions, else ``(None, reason or None)``."""
  eqns = jaxpr.eqns
  v = jaxpr.invars[leaf]
  while True:
    us = uses_of.get(v, [])
    if v in outs or len(us) != 1:
      return None, None
    i, pos = us[0]
    eqn = eqns[i]
    if eqn.primitive.name in _dense_gram._VIEWS:
      v = eqn.outvars[0]
      continue
    break
  if eqn.primitive.name != "dot_general":
    return None, None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if not lb:
    return None, None
  act_pos = 1 - pos
  a_aval, w_aval = eqn.invars[act_pos].aval, eqn.invars[pos].aval
  a_con, w_con = (lc, rc) if act_pos == 0 else (rc, lc)
  a_b, w_b = (lb, rb) if act_pos == 0 else (rb, lb)
  rest = [j for j in range(len(a_aval.shape)) if j not in a_b]
  r = math.prod(a_aval.shape[j] for j in rest if j not in a_con)
  c = math.prod(a_aval.shape[j] for j in a_con)
  f = math.prod(d for j, d in enumerate(w_aval.shape) if j not in w_con and j not in w_b)
  if _dense_gram._explicitly_sharded(a_aval):
    return None, "dense (batched), but its activation is split over an explicit mesh axis"
  why = choose(r, c, f, num_tasks)
  if why is not None:
    return None, why.replace("dense,", "dense (batched),", 1)
  use = _dense_gram.DenseUse(leaf, i, act_pos, tuple(rest.index(j) for j in a_con), (), (), r, c, f)
  nbatch = math.prod(a_aval.shape[j] for j in a_b)
  return BatchedUse(leaf, i, act_pos, tuple(a_b), nbatch, use), None


def _local_label(r, old):
  if isinstance(r, _reach.Axis):
    return "task-local (per-task slices)"
  if len(r) == 1:
    return "task-local (tower)"
  return "unused" if old == "unused" else "reaches no loss"


def analyse(flat, choose: Callable, p=None) -> Routes:
  """Every leaf's route for ``flat`` (a :class:`_dense_gram.Flat`), from the
  dense-layer plan ``p`` of the same function (made here if None)."""
  n = len(flat.diff)
  if p is None:
    p = _dense_gram.plan(flat, [*flat.diff, *flat.arrays], n, choose)
  jaxpr = p.jaxpr.jaxpr
  num_tasks = jaxpr.outvars[0].aval.shape[0]
  reasons = dict(p.reasons)
  uses_of, outs = _uses(jaxpr)
  covered = {u.leaf for u in p.uses}
  batched, tables = {}, {}
  for k in range(n):
    if k in covered:
      continue
    b, why = _batched(jaxpr, k, uses_of, outs, num_tasks, choose)
    if b is not None:
      batched[k] = b
      reasons[k] = "dense (batched)"
      continue
    if why is not None:
      reasons[k] = why
      continue
    tab, why = _embedding_gram.find(jaxpr, k, uses_of, outs)
    if tab is not None:
      tables[k] = tab
      reasons[k] = "embedding"
    elif why is not None:
      reasons[k] = why
  # gram="dense": the identity wherever it applies, task-local leaves included
  forced = sorted(covered) if choose is _dense_gram.any_dense else []
  pinned = sorted(covered | set(batched) | set(tables))
  sp = _reach.split(jaxpr, n, num_tasks, forced, pinned)
  head = set(sp.head_leaves)
  for k in head:
    reasons[k] = _local_label(sp.leaf_reach[k], p.reasons[k])
  dense = tuple(u for u in p.uses if u.leaf not in head)
  batched_uses = tuple(b for k, b in batched.items() if k not in head)
  table_uses = tuple(tab for k, tab in tables.items() if k not in head)
  return Routes(p.jaxpr, num_tasks, dense, batched_uses, table_uses, sp, reasons)


# ----------------------------------------------------------------- evaluation


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(outs) if eqn.primitive.multiple_results else [outs]


def _run(jaxpr, env, order, pre=None, post=None):
  for i in order:
    eqn = jaxpr.eqns[i]
    invals = [_read(env, v) for v in eqn.invars]
    if pre is not None:
      invals = pre(i, invals)
    outs = _bind(eqn, invals)
    if post is not None:
      outs = post(i, invals, outs)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x


def _zeros(aval):
  """Zeros of ``aval``'s type (its sharding too, on an explicit mesh: the
  cotangents pulled back from them must have the outputs' types)."""
  if _dense_gram._explicitly_sharded(aval):
    return jnp.zeros(aval.shape, aval.dtype, out_sharding=aval.sharding)
  return jnp.zeros(aval.shape, aval.dtype)


def _slice_shape(axis, n, ndim, lead=0):
  shape = [1] * (lead + ndim)
  shape[lead + axis] = n
  return shape


def _task_scale(axis, tasks, w, ndim):
  """``w[tasks[i]]`` (0 where None), shaped to broadcast along ``axis``."""
  idx = np.array([0 if t is None else t for t in tasks])
  ws = jnp.where(np.array([t is not None for t in tasks]), w[idx], jnp.zeros((), w.dtype))
  return ws.reshape(_slice_shape(axis, len(tasks), ndim))


def _mask_by_task(c, axis, tasks, num_tasks):
  """``(T, *c.shape)``: row ``t`` keeps the slices of ``c`` that are task ``t``'s."""
  m = np.array([[s == t for s in tasks] for t in range(num_tasks)])
  m = m.reshape([num_tasks] + _slice_shape(axis, len(tasks), c.ndim)[0:])
  return jnp.where(m, c[None], jnp.zeros((), c.dtype))


def _group(x, tasks, num_tasks):
  """Per-slice ``x`` (``(n, ...)``) summed into per-task rows ``(T, ...)``."""
  if tuple(tasks) == tuple(range(num_tasks)):
    return x
  idx = [i for i, t in enumerate(tasks) if t is not None]
  seg = np.array([tasks[i] for i in idx], np.int32)
  return jax.ops.segment_sum(x[np.array(idx, np.int32)], seg, num_segments=num_tasks)


def _abs2(g, acc):
  g = g.astype(jnp.result_type(acc, g.dtype))
  return jnp.real(g * jnp.conj(g)) if jnp.iscomplexobj(g) else g * g


def _local_diag(r, g, num_tasks, acc):
  """The diagonal of a task-local leaf's block from its all-ones gradient."""
  if isinstance(r, _reach.Axis):
    axes = tuple(j for j in range(g.ndim) if j != r.axis)
    sq = jnp.sum(_abs2(g, acc), axis=axes).astype(acc)
    return _group(sq, r.tasks, num_tasks)
  if not r:
    return jnp.zeros((num_tasks,), acc)
  (t,) = tuple(r)
  return jax.nn.one_hot(t, num_tasks, dtype=acc) * jnp.sum(_abs2(g, acc)).astype(acc)


def _scale_local(r, g, w):
  """A task-local leaf's weighted gradient from its all-ones gradient."""
  if isinstance(r, _reach.Axis):
    return (g * _task_scale(r.axis, r.tasks, w, g.ndim)).astype(g.dtype)
  if not r:
    return jnp.zeros_like(g)
  (t,) = tuple(r)
  return (g * w[t]).astype(g.dtype)


def _sliced_dot_cot(eqn, pos, vals, cot, a, j):
  """Per-slice cotangents ``(n, *operand.shape)`` of operand ``pos`` of a
  dot_general whose output axis ``a`` is the other operand's free
  dimension ``j``: slice ``i`` is the pullback of output slice ``i`` through
  the product with operand slice ``i``."""
  other = 1 - pos
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]

  def fix(ds):
    return tuple(d - (d > j) for d in ds)

  if other == 0:
    dn = ((fix(lc), tuple(rc)), (fix(lb), tuple(rb)))
  else:
    dn = ((tuple(lc), fix(rc)), (tuple(lb), fix(rb)))
  params = dict(eqn.params, dimension_numbers=dn)
  if params.get("out_sharding") is not None:
    params["out_sharding"] = None

  def one(o, c):
    def f(x):
      ops = [None, None]
      ops[pos], ops[other] = x, o
      with eqn.ctx.manager:
        return eqn.primitive.bind(*ops, **params)

    return jax.vjp(f, vals[pos])[1](c)[0]

  return jax.vmap(one, in_axes=(j, a))(vals[other], cot)


def _sliced_broadcast_cot(eqn, val, cot, a):
  """Per-slice cotangents ``(n, *operand.shape)`` of a broadcast_in_dim's
  operand broadcast along the task axis ``a`` of the output (a new axis, or
  one of size 1 in the operand)."""
  oshape = tuple(eqn.outvars[0].aval.shape)
  shape = oshape[:a] + oshape[a + 1 :]
  bd = list(eqn.params["broadcast_dimensions"])
  x = val
  if a in bd:  # a size-1 dimension of the operand
    x = jnp.squeeze(val, bd.index(a))
    bd.remove(a)
  dims = tuple(d - (d > a) for d in bd)

  def one(c):
    return jax.vjp(lambda x: jax.lax.broadcast_in_dim(x, shape, dims), x)[1](c)[0]

  out = jax.vmap(one, in_axes=a)(cot)
  return out.reshape((oshape[a], *jnp.shape(val)))


def _sliced_elementwise_cot(eqn, pos, vals, cot, a):
  """Per-slice cotangents ``(n, *operand.shape)`` of an elementwise
  operation's operand ``pos``, a scalar or of size 1 along the task axis
  ``a`` of the output."""
  oshape = tuple(eqn.outvars[0].aval.shape)
  nd = len(oshape)
  ops, axes = [], []
  for p, x in enumerate(vals):
    if jnp.ndim(x) == nd and jnp.shape(x)[a] == oshape[a] and p != pos:
      ops.append(x)
      axes.append(a)
    elif jnp.ndim(x) == nd:
      ops.append(jnp.squeeze(jnp.asarray(x), a))
      axes.append(None)
    else:
      ops.append(x)
      axes.append(None)

  def one(*args):
    *xs, c = args

    def f(x):
      ys = list(xs)
      ys[pos] = x
      return _bind(eqn, ys)[0]

    return jax.vjp(f, ops[pos])[1](c)[0]

  out = jax.vmap(one, in_axes=(*axes, a))(*ops, cot)
  return out.reshape((oshape[a], *jnp.shape(vals[pos])))


@dataclasses.dataclass
class LeanVJP:
  """The traced forward pass of :func:`lean_vjp` and its two pullbacks."""

  flat: Any
  routes: Routes
  losses: Any
  aux_leaves: Any
  gram: Callable  # gram(selected: list[bool], acc) -> (T, T)
  pull_back: Callable  # pull_back(w) -> leaf cotangents (flat order)


def lean_vjp(flat, rt: Routes, leaves, arrays) -> LeanVJP:
  """``flat``'s forward pass at ``leaves`` (the differentiated leaves) and
  ``arrays`` (the other array arguments), split into trunk and head, with
  every Gram route of ``rt``: a :class:`LeanVJP`. Errors propagate (the
  caller guards the whole route)."""
  closed = rt.jaxpr
  jaxpr = closed.jaxpr
  sp = rt.split
  n = len(flat.diff)
  t = rt.num_tasks
  leaves = list(leaves)
  invars = jaxpr.invars
  tleaf = [k for k in range(n) if k not in set(sp.head_leaves)]

  # Trunk perturbations: (equation, operand recorded) per covered product / lookup.
  perts = [(u.eqn, u.act_pos) for u in rt.dense] + [(b.eqn, b.act_pos) for b in rt.batched]
  table_q = []
  for tab in rt.tables:
    table_q.append([len(perts) + m for m in range(len(tab.lookups))])
    perts += [(i, 1) for i in tab.lookups]
  by_eqn: dict = {}
  for q, (i, _) in enumerate(perts):
    by_eqn.setdefault(i, []).append(q)
  zs = [_zeros(jaxpr.eqns[i].outvars[0].aval) for i, _ in perts]

  def base_env():
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(invars[n:], arrays))
    env.update(zip(invars[:n], leaves))
    return env

  def trunk(tl, zs):
    env = base_env()
    env.update((invars[k], x) for k, x in zip(tleaf, tl))
    recs = [None] * len(perts)

    def post(i, invals, outs):
      qs = by_eqn.get(i)
      if qs is None:
        return outs
      y = outs[0]
      for q in qs:
        recs[q] = invals[perts[q][1]]
        y = y + zs[q]
      return [y, *outs[1:]]

    _run(jaxpr, env, sp.trunk, post=post)
    return [_read(env, v) for v in sp.bvars], (recs, [_read(env, v) for v in sp.head_reads])

  bvals, trunk_vjp, (recs, reads) = jax.vjp(trunk, [leaves[k] for k in tleaf], zs, has_aux=True)

  subst = [s for s in sp.sites if s.kind in ("task", "axis")]
  subst_at = {(s.eqn, s.pos): j for j, s in enumerate(subst)}
  out_site = next((j for j, s in enumerate(subst) if s.eqn < 0), None)
  sliced = [s for s in sp.sites if s.kind not in ("task", "axis")]
  zc_eqns = sorted({s.eqn for s in sliced})
  zc_at = {i: j for j, i in enumerate(zc_eqns)}
  zcs = [_zeros(jaxpr.eqns[i].outvars[0].aval) for i in zc_eqns]

  def head(hl, svals, zcs):
    env = base_env()
    env.update(zip(sp.head_reads, reads))
    env.update((invars[k], x) for k, x in zip(sp.head_leaves, hl))
    hrecs: list[list[Any] | None] = [None] * len(zc_eqns)

    def pre(i, invals):
      for p in range(len(invals)):
        j = subst_at.get((i, p))
        if j is not None:
          invals[p] = svals[j]
      return invals

    def post(i, invals, outs):
      j = zc_at.get(i)
      if j is None:
        return outs
      hrecs[j] = list(invals)
      return [outs[0] + zcs[j]]

    _run(jaxpr, env, sp.head, pre, post)
    losses = svals[out_site] if out_site is not None else _read(env, jaxpr.outvars[0])
    return losses, ([_read(env, v) for v in jaxpr.outvars[1:]], hrecs)

  svals = [bvals[s.var] for s in subst]
  losses, head_vjp, (aux_leaves, hrecs) = jax.vjp(
    head, [leaves[k] for k in sp.head_leaves], svals, zcs, has_aux=True
  )
  g_head, g_sub, g_zc = head_vjp(jnp.ones_like(losses))

  def site_cots():
    """Per-task cotangents ``(T, *value.shape)`` of the trunk values."""
    terms: list[list[jax.Array]] = [[] for _ in sp.bvars]
    by_task: list[dict[int, jax.Array]] = [{} for _ in sp.bvars]
    for j, s in enumerate(subst):
      c = g_sub[j]
      if s.kind == "task":
        prev = by_task[s.var].get(s.task)
        by_task[s.var][s.task] = c if prev is None else prev + c
      else:
        terms[s.var].append(_mask_by_task(c, s.axis, s.tasks, t))
    for s in sliced:
      j = zc_at[s.eqn]
      eqn = jaxpr.eqns[s.eqn]
      if s.kind == "dot":
        x = _sliced_dot_cot(eqn, s.pos, hrecs[j], g_zc[j], s.axis, s.other_axis)
      elif s.kind == "broadcast":
        x = _sliced_broadcast_cot(eqn, hrecs[j][0], g_zc[j], s.axis)
      else:
        x = _sliced_elementwise_cot(eqn, s.pos, hrecs[j], g_zc[j], s.axis)
      terms[s.var].append(_group(x, s.tasks, t))
    out = []
    for v, bv in enumerate(bvals):
      ts = terms[v]
      if by_task[v]:
        zero = jnp.zeros_like(bv)
        ts.append(jnp.stack([by_task[v].get(k, zero) for k in range(t)]))
      out.append(sum(ts[1:], ts[0]) if ts else jnp.broadcast_to(jnp.zeros_like(bv), (t, *bv.shape)))
    return out

  def gram(selected, acc):
    k_mat = jnp.zeros((t, t), acc)
    diag = jnp.zeros((t,), acc)
    for k, g in zip(sp.head_leaves, g_head):
      if selected[k]:
        diag = diag + _local_diag(sp.leaf_reach[k], g, t, acc)
    if sp.bvars and any(selected[k] for k in tleaf):
      g_trunk, g_z = jax.vmap(trunk_vjp)(site_cots())
      covered = {u.leaf for u in rt.dense} | {b.leaf for b in rt.batched}
      covered |= {tab.leaf for tab in rt.tables}
      rest = [g for k, g in zip(tleaf, g_trunk) if selected[k] and k not in covered]
      if rest:
        k_mat = k_mat + gram_matrix(rest).astype(acc)
      for q, u in enumerate(rt.dense):
        if selected[u.leaf]:
          k_mat = k_mat + _dense_gram.block(u, recs[q], g_z[q], acc)
      off = len(rt.dense)
      for q, b in enumerate(rt.batched):
        if selected[b.leaf]:
          k_mat = k_mat + _batched_block(b, recs[off + q], g_z[off + q], acc)
      for tab, qs in zip(rt.tables, table_q):
        if selected[tab.leaf]:
          ids = [recs[q] for q in qs]
          k_mat = k_mat + _embedding_gram.block(tab, ids, [g_z[q] for q in qs], acc)
    return 0.5 * (k_mat + k_mat.T) + jnp.diag(diag)

  def pull_back(w):
    grads = [None] * n
    for k, g in zip(sp.head_leaves, g_head):
      grads[k] = _scale_local(sp.leaf_reach[k], g, w)
    if not tleaf:
      return grads
    if sp.bvars:
      cots = [jnp.zeros_like(bv) for bv in bvals]
      for j, s in enumerate(subst):
        c = g_sub[j]
        if s.kind == "task":
          c = c * w[s.task]
        else:
          c = c * _task_scale(s.axis, s.tasks, w, c.ndim)
        cots[s.var] = cots[s.var] + c.astype(bvals[s.var].dtype)
      for s in sliced:
        j = zc_at[s.eqn]
        eqn = jaxpr.eqns[s.eqn]
        c = g_zc[j]
        c = (c * _task_scale(s.axis, s.tasks, w, c.ndim)).astype(c.dtype)
        ins = hrecs[j]

        def f(x, ins=ins, pos=s.pos, eqn=eqn):
          vals = list(ins)
          vals[pos] = x
          return _bind(eqn, vals)[0]

        cots[s.var] = cots[s.var] + jax.vjp(f, ins[s.pos])[1](c)[0]
      g_trunk, _ = trunk_vjp(cots)
    else:
      g_trunk = [jnp.zeros_like(leaves[k]) for k in tleaf]
    for k, g in zip(tleaf, g_trunk):
      grads[k] = g
    return grads

  return LeanVJP(flat, rt, losses, aux_leaves, gram, pull_back)


def _batched_block(b: BatchedUse, act, d, acc):
  """Sum over the batch indices of the dense identity's blocks."""
  nt = d.shape[0]
  rest = [j for j in range(act.ndim) if j not in b.act_batch]
  a = jnp.transpose(act, list(b.act_batch) + rest)
  a = a.reshape((b.nbatch, *[act.shape[j] for j in rest]))
  nb = len(b.act_batch)
  dd = d.reshape((nt, b.nbatch, *d.shape[1 + nb :]))
  dd = jnp.swapaxes(dd, 0, 1)
  blocks = jax.vmap(lambda a1, d1: _dense_gram.block(b.use, a1, d1, acc))(a, dd)
  return jnp.sum(blocks, axis=0)
