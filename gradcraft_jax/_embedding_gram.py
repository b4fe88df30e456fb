r"""The Gram block of an embedding table from its lookups' cotangents.

A table ``E`` (``V`` rows) read by row lookups ``o_j = E[ids_j]`` (any
number of gathers of the same table: several features sharing a
vocabulary, multi-valued ``(B, L)`` features, duplicate ids) has per-task
gradient

.. math:: g_t = \sum_n e_{\mathrm{id}_n} \otimes d_t[n],

with ``d_t[n]`` task ``t``'s cotangent of lookup ``n``'s output row (all
lookups of the table concatenated, ``N`` of them). Summing the cotangents
by id, :math:`S_t[v] = \sum_{n : \mathrm{id}_n = v} d_t[n]`, gives

.. math:: K_E[s, t] = \langle g_s, g_t \rangle = \sum_v \langle S_s[v], S_t[v]\rangle ,

with at most ``min(N, V)`` non-zero ``S[v]``: one sort of the ids, one
segment sum of the ``(N, T, D)`` cotangents and a ``(T, T)`` contraction.
Memory ``O(T N D)`` and flops ``O(T N D + T^2 min(N, V) D)``, independent
of the vocabulary; the ``T`` table-sized gradients of the per-task
pullback are never formed. Duplicate ids are summed before the inner
product, as the gather's transpose (a scatter-add) sums them, and lookups
of one table from different features go into one segment sum, so the cross
terms between them are included.

Ids are normalised as the gather treats them in its derivative (its
``mode``): ``clip`` clamps them to ``[0, V - 1]``; ``fill`` (``jnp.take``'s
default) and ``promise_in_bounds`` (``x[ids]``) drop the cotangent of an
out-of-range lookup (the scatter-add that is the gather's transpose skips
it), so those lookups are masked out. Negative ids are wrapped by
``jnp`` before the gather, so the gather sees the wrapped ids.

Covered gathers read whole rows of the table (``collapsed_slice_dims=(0,)``,
``start_index_map=(0,)``, slice sizes ``(1, *row)``, the row's axes last in
the output): ``table[ids]``, ``jnp.take(table, ids, axis=0)``,
``flax.nnx.Embed``, ``flax.linen.Embed``, the table possibly reshaped,
transposed or cast on the way. A table with any other use keeps the
per-task pullback.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax._src.lax.slicing import GatherScatterMode

from gradcraft_jax import _dense_gram


@dataclasses.dataclass(frozen=True)
class TableUse:
  """A covered table: differentiated leaf ``leaf`` read by the row gathers
  ``lookups`` (equation indices of the inlined jaxpr)."""

  leaf: int
  lookups: tuple
  clip: tuple  # per lookup: ids clamped (True) or out-of-range lookups dropped
  rows: int  # V
  width: int  # elements per row (D)


def _row_lookup(eqn) -> str | None:
  """None if ``eqn`` (a gather whose operand is the table) reads whole rows
  of its operand, else why not."""
  dn = eqn.params["dimension_numbers"]
  shape = tuple(eqn.invars[0].aval.shape)
  idx_shape = tuple(eqn.invars[1].aval.shape)
  out_nd = len(eqn.outvars[0].aval.shape)
  rest = shape[1:]
  mode = GatherScatterMode.from_any(eqn.params["mode"])
  if mode not in (
    GatherScatterMode.CLIP,
    GatherScatterMode.FILL_OR_DROP,
    GatherScatterMode.PROMISE_IN_BOUNDS,
  ):
    return f"mode {mode.name.lower()}"
  whole_rows = (
    len(shape) >= 1
    and idx_shape[-1:] == (1,)
    and tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not tuple(getattr(dn, "operand_batching_dims", ()))
    and not tuple(getattr(dn, "start_indices_batching_dims", ()))
    and tuple(eqn.params["slice_sizes"]) == (1, *rest)
    and tuple(dn.offset_dims) == tuple(range(out_nd - len(rest), out_nd))
  )
  return None if whole_rows else "not a lookup of whole rows"


def find(jaxpr, leaf: int, uses_of: dict, outs: set):
  """``(TableUse, None)`` if leaf ``leaf`` of ``jaxpr`` (through views) is
  read only by row gathers, else ``(None, reason)`` (reason None: nothing
  to say beyond the dense analysis' own)."""
  eqns = jaxpr.eqns
  v = jaxpr.invars[leaf]
  while True:
    if v in outs:
      return None, None
    us = uses_of.get(v, [])
    if len(us) == 1 and eqns[us[0][0]].primitive.name in _dense_gram._VIEWS:
      v = eqns[us[0][0]].outvars[0]
      continue
    break
  if not us:
    return None, None
  names = sorted({eqns[i].primitive.name for i, _ in us})
  if "gather" not in names:
    return None, None
  if names != ["gather"]:
    return None, f"used by {' and '.join(names)}"
  lookups, clip = [], []
  for i, pos in us:
    if pos != 0:
      return None, "used as gather indices"
    why = _row_lookup(eqns[i])
    if why is not None:
      return None, f"used by gather ({why})"
    lookups.append(i)
    clip.append(GatherScatterMode.from_any(eqns[i].params["mode"]) == GatherScatterMode.CLIP)
  shape = tuple(v.aval.shape)
  return TableUse(leaf, tuple(lookups), tuple(clip), shape[0], math.prod(shape[1:])), None


def block(use: TableUse, ids: list, cots: list, acc) -> jax.Array:
  """``(T, T)`` Gram block of a covered table from each lookup's index
  operand ``ids[j]`` (``(*batch, 1)``) and stacked output cotangents
  ``cots[j]`` (``(T, *batch, *row)``)."""
  t = cots[0].shape[0]
  rows, flat_ids = [], []
  for clip, idx, d in zip(use.clip, ids, cots):
    idx = idx.reshape(-1)
    d = d.reshape(t, idx.shape[0], use.width).astype(acc)
    if clip:
      idx = jnp.clip(idx, 0, use.rows - 1)
    else:
      valid = (idx >= 0) & (idx < use.rows)
      d = jnp.where(valid[None, :, None], d, jnp.zeros((), acc))
      idx = jnp.where(valid, idx, jnp.zeros((), idx.dtype))
    rows.append(jnp.swapaxes(d, 0, 1))  # (n, T, D)
    flat_ids.append(idx.astype(jnp.int32) if use.rows < 2**31 else idx)
  idx = jnp.concatenate(flat_ids)
  d = jnp.concatenate(rows)
  n = idx.shape[0]
  order = jnp.argsort(idx)
  sid = idx[order]
  seg = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), (sid[1:] != sid[:-1])]))
  s = jax.ops.segment_sum(d[order], seg, num_segments=min(n, use.rows), indices_are_sorted=True)
  return jnp.einsum("msd,mtd->st", s, s, precision=jax.lax.Precision.HIGHEST)
