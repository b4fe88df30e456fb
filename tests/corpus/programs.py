"""Random small programs built from the primitives the fast routes follow.

A program is a chain of operations on a ``(B, D)`` activation, each with its
own parameters, then a dense head giving ``T`` squared-error losses:

* ``dense``: a weight stored in another layout than the product reads
  (transposed, reshaped, flattened, with a unit axis), cast on the way or
  not, in a ``dot_general`` with random dimension numbers (one or two
  contracted axes, the weight on either side, the activation transposed);
* ``experts``: a stacked weight applied with a batch dimension (the expert
  axis at a random position of the stored weight, either operand order);
* ``gather``: an embedding table read at ids with duplicates (and, in
  ``clip`` and ``fill`` mode, out of range);
* ``scan``: a recurrent weight applied by ``lax.scan``;
* ``cond``: ``lax.cond`` between two weights;
* ``custom_vjp``: a product with a hand-written (linear) backward rule;
* ``clip_vjp``: JAX's gradient-clipping ``custom_vjp`` on the activation or
  the weight (a backward rule not linear in the cotangent);
* ``int_cast``: a weight cast to int8 before its product (zero gradient);
* ``cast``: the activation cast to bfloat16, float32 or an integer and back;
* ``view``: the activation's features permuted by reshape and transpose;
* ``tied``: one weight used by two products.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from . import models

B, T = models.B, models.T
WIDTHS = (4, 6, 8)
OPS = (
  "dense",
  "experts",
  "gather",
  "scan",
  "cond",
  "custom_vjp",
  "clip_vjp",
  "int_cast",
  "cast",
  "view",
  "tied",
)
_LAYOUTS = ("plain", "transposed", "split_out", "expanded", "flat")
_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
_BF16 = {"float32": 3e-2, "float64": 3e-2}
_F32_IN_F64 = {"float64": 1e-6}  # a float32 cast inside a float64 program


@dataclasses.dataclass(frozen=True)
class Program:
  width: int  # the input's features
  ops: tuple  # ((kind, options dict as sorted pairs), ...)
  seed: int

  def __str__(self):
    ops = ", ".join(f"{k}({', '.join(f'{a}={v!r}' for a, v in o)})" for k, o in self.ops)
    return f"Program(width={self.width}, seed={self.seed}: {ops})"

  @property
  def kinds(self) -> set:
    return {k for k, _ in self.ops}


def _split(d):
  return (2, d // 2)


@st.composite
def _op(draw, kind, width):
  """One operation's options and its output width."""
  out = draw(st.sampled_from(WIDTHS))
  o = {}
  if kind == "dense":
    o = dict(
      out=out,
      layout=draw(st.sampled_from(_LAYOUTS)),
      cast=draw(st.sampled_from((None, None, "bfloat16", "float32"))),
      two_axes=draw(st.booleans()),
      weight_left=draw(st.booleans()),
      act_t=draw(st.booleans()),
    )
  elif kind == "experts":
    o = dict(
      out=out,
      experts=draw(st.sampled_from((2, 3))),
      perm=draw(st.sampled_from(range(len(_PERMS)))),
      weight_left=draw(st.booleans()),
    )
  elif kind == "gather":
    o = dict(
      vocab=draw(st.sampled_from((5, 7))),
      k=draw(st.sampled_from((2, 3))),
      mode=draw(st.sampled_from(("promise_in_bounds", "clip", "fill"))),
    )
    out = width
  elif kind == "scan":
    o = dict(steps=draw(st.sampled_from((2, 3))))
    out = width
  elif kind == "cond":
    o = dict(out=out, flag=draw(st.booleans()))
  elif kind in ("custom_vjp", "int_cast"):
    o = dict(out=out)
  elif kind == "clip_vjp":
    o = dict(out=out, on=draw(st.sampled_from(("activation", "weight"))))
  elif kind == "cast":
    o = dict(to=draw(st.sampled_from(("bfloat16", "float32", "int32"))))
    out = width
  elif kind in ("view", "tied"):
    out = width
  return tuple(sorted(o.items())), out


@st.composite
def programs(draw, kinds=OPS, require=()):
  """Programs of one to three operations drawn from ``kinds``, with at
  least one from ``require`` when given."""
  n = draw(st.integers(1, 3))
  chosen = [draw(st.sampled_from(kinds)) for _ in range(n)]
  if require and not set(chosen) & set(require):
    chosen[draw(st.integers(0, n - 1))] = draw(st.sampled_from(require))
  width = d = draw(st.sampled_from(WIDTHS))
  ops = []
  for kind in chosen:
    options, d = draw(_op(kind, d))
    ops.append((kind, options))
  return Program(width, tuple(ops), draw(st.integers(0, 2**16)))


def rtol(program: Program) -> dict | None:
  """The program's tolerance overrides (lossy casts)."""
  out = {}
  for kind, o in program.ops:
    o = dict(o)
    to = o.get("to", o.get("cast"))
    extra = _BF16 if to == "bfloat16" else _F32_IN_F64 if to == "float32" else {}
    for k, v in extra.items():
      out[k] = max(out.get(k, 0.0), v)
  return out or None


def build(program: Program) -> models.Case:
  """The program as a corpus case: ``fun(params, x, y, batch)``."""
  rng = np.random.default_rng(program.seed)

  def normal(shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

  params, batch, layers = {}, {}, []
  d = program.width
  for i, (kind, o) in enumerate(program.ops):
    o = dict(o)
    name = f"{i}_{kind}"
    layers.append(_layer(kind, o, name, d, params, batch, normal, rng))
    d = o.get("out", d)
  params["head"] = normal((d, T), 1 / np.sqrt(d))
  params["head_b"] = normal((T,), 0.1)

  def fun(params, x, y, batch):
    h = x
    for layer in layers:
      h = layer(params, h, batch)
    return jnp.mean((h @ params["head"] + params["head_b"] - y) ** 2, axis=0)

  x, y = normal((B, program.width)), normal((B, T))
  int_cast = tuple(
    f"['{i}_int_cast']" for i, (kind, _) in enumerate(program.ops) if kind == "int_cast"
  )
  return models.Case(fun, (params, x, y, batch), rtol=rtol(program), not_dense=int_cast)


def _layer(kind, o, name, d, params, batch, normal, rng):
  """Adds the operation's parameters and inputs; returns ``layer(params, h,
  batch) -> h``."""
  out = o.get("out", d)
  scale = 1 / np.sqrt(d)

  if kind == "dense":
    w = np.asarray(normal((d, out), scale))
    stored = {
      "plain": w,
      "transposed": w.T,
      "split_out": w.reshape(d, 2, out // 2),
      "expanded": w[None],
      "flat": w.reshape(-1),
    }[o["layout"]]
    params[name] = jnp.asarray(stored)
    a, b = _split(d)

    def layer(p, h, batch):
      s = p[name]
      w = {
        "plain": lambda: s,
        "transposed": lambda: s.T,
        "split_out": lambda: s.reshape(d, out),
        "expanded": lambda: jnp.squeeze(s, 0),
        "flat": lambda: s.reshape(d, out),
      }[o["layout"]]()
      if o["cast"]:
        w = w.astype(o["cast"]).astype(h.dtype)
      if o["two_axes"]:
        hx, w = h.reshape(B, a, b), w.reshape(a, b, out)
        hc, wc = ((1, 2), (0, 1))
        if o["act_t"]:
          hx, hc = jnp.transpose(hx, (1, 2, 0)), (0, 1)
      else:
        hx, hc, wc = h, (1,), (0,)
        if o["act_t"]:
          hx, hc = h.T, (0,)
      if o["weight_left"]:
        y = jax.lax.dot_general(w, hx, ((wc, hc), ((), ()))).T
      else:
        y = jax.lax.dot_general(hx, w, ((hc, wc), ((), ())))
      return jnp.tanh(y)

    return layer

  if kind == "experts":
    e, perm = o["experts"], _PERMS[o["perm"]]
    params[name] = jnp.transpose(normal((e, d, out), scale), perm)
    pos_e, pos_d = perm.index(0), perm.index(1)

    def layer(p, h, batch):
      xe = jnp.broadcast_to(h, (e, *h.shape))  # (E, B, D)
      if o["weight_left"]:
        y = jax.lax.dot_general(p[name], xe, (((pos_d,), (2,)), ((pos_e,), (0,))))
        y = jnp.swapaxes(y, 1, 2)  # (E, F, B) -> (E, B, F)
      else:
        y = jax.lax.dot_general(xe, p[name], (((2,), (pos_d,)), ((0,), (pos_e,))))
      return jnp.tanh(y.mean(0))

    return layer

  if kind == "gather":
    vocab, k, mode = o["vocab"], o["k"], o["mode"]
    params[name] = normal((vocab, d))
    ids = rng.integers(0, vocab, (B, k))
    ids[0, :] = ids[0, 0]  # duplicates
    if mode != "promise_in_bounds":
      ids[1, 0], ids[2, -1] = vocab + 2, -vocab - 3  # out of range both ways
    batch[name] = jnp.asarray(ids, jnp.int32)

    def layer(p, h, batch):
      rows = p[name].at[batch[name]].get(mode=mode, fill_value=0.0 if mode == "fill" else None)
      return jnp.tanh(h + rows.sum(1))

    return layer

  if kind == "scan":
    params[name] = normal((d, d), scale)
    params[name + "_b"] = normal((d,), 0.1)
    steps = o["steps"]

    def layer(p, h, batch):
      def body(c, x_t):
        c = jnp.tanh(c @ p[name] + x_t + p[name + "_b"])
        return c, c.sum(-1)

      xs = jnp.stack([h * s for s in (0.5, 1.0, -0.5)[:steps]])
      c, ys = jax.lax.scan(body, h, xs)
      return c + 0.1 * ys.mean(0)[:, None]

    return layer

  if kind == "cond":
    params[name + "_a"] = normal((d, out), scale)
    params[name + "_b"] = normal((d, out), scale)
    batch[name] = jnp.asarray(o["flag"])

    def layer(p, h, batch):
      y = jax.lax.cond(
        batch[name], lambda h: h @ p[name + "_a"], lambda h: 0.5 * (h @ p[name + "_b"]), h
      )
      return jnp.tanh(y)

    return layer

  if kind == "custom_vjp":
    params[name] = normal((d, out), scale)
    return lambda p, h, batch: jnp.tanh(models.linear_layer(h, p[name]))

  if kind == "clip_vjp":
    params[name] = normal((d, out), scale)

    def layer(p, h, batch):
      w = p[name]
      if o["on"] == "weight":
        w = models.clip_gradient(-0.05, 0.05, w)
      else:
        h = models.clip_gradient(-0.02, 0.02, h)
      return jnp.tanh(h @ w)

    return layer

  if kind == "int_cast":
    params[name] = normal((d, out), 20.0)  # quantisation units

    def layer(p, h, batch):
      return jnp.tanh((h @ p[name].astype(jnp.int8).astype(h.dtype)) * (0.02 * scale))

    return layer

  if kind == "cast":
    to = o["to"]

    def layer(p, h, batch):
      if to == "int32":  # a float -> int cast beside the activation
        return h + 0.1 * jnp.round(3 * h).astype(jnp.int32).astype(h.dtype)
      return h.astype(to).astype(h.dtype)

    return layer

  if kind == "view":
    a, b = _split(d)
    return lambda p, h, batch: jnp.transpose(h.reshape(B, a, b), (0, 2, 1)).reshape(B, d)

  if kind == "tied":
    params[name] = normal((d, d), scale)
    return lambda p, h, batch: jnp.tanh(jnp.tanh(h @ p[name]) @ p[name])

  raise ValueError(kind)
