"""Accuracy of the Gram matrix routes against float64, across input offsets.

A dense layer fed by raw features around a common offset (``x = offset +
N(0, 1)``), followed by batch normalisation (so the per-task output
cotangents of the layer sum to nearly zero over the batch), a tanh and one
linear head per task. The reference is the Gram matrix of ``jax.jacrev``'s
per-task gradients computed in float64 at the same float32-representable
inputs; every route runs in float32:

* ``identity, uncentred``: ``<(a a^T) d_s, d_t>`` as written (the formula
  before centring, from the layer's activation and output cotangents; the
  head's block from its per-task gradients);
* ``lean, gram="dense"``: :func:`gradcraft_jax.combined_value_and_grad`'s
  dense-layer identity (the activation centred: ``a = 1 mu^T + a~``, the
  mean terms added exactly);
* ``lean, gram="pullback"``: per-task pullbacks, then ``gram_matrix``;
* ``stacked (per_task_value_and_grad)``: the default stacked gradients
  (the layer's ``a^T d_t`` as one batched product), then ``gram_matrix``.

The error is ``max |K - K64| / max |K64|`` (whole Gram matrix). Prints a
Markdown table. Run: ``python benchmarks/dense_gram_accuracy.py``
(``--quick``: smaller sizes).
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gradcraft_jax as gj  # noqa: E402

OFFSETS = (1.0, 1e2, 1e3, 1e4)


def model(rows, cols, feats, tasks, offset, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w": (rng.normal(size=(cols, feats)) / np.sqrt(cols)).astype(np.float32),
    "head": (rng.normal(size=(feats, tasks)) / np.sqrt(feats)).astype(np.float32),
  }
  x = (offset + rng.normal(size=(rows, cols))).astype(np.float32)
  y = rng.normal(size=(rows, tasks)).astype(np.float32)

  def after_layer(h, p, y):
    h = (h - jnp.mean(h, 0)) / jnp.sqrt(jnp.var(h, 0) + 1e-5)  # batch norm
    return jnp.mean((jnp.tanh(h) @ p["head"] - y) ** 2, axis=0)

  def fun(p, x, y):
    return after_layer(x @ p["w"], p, y)

  return fun, after_layer, params, x, y


def _probe(tasks):
  """A method whose state is the Gram matrix it was given."""
  return gj.from_weighting(
    gj.Weighting(
      lambda p: jnp.zeros((tasks, tasks), jnp.float32),
      lambda gram, state, losses, *, num_tasks, **kw: (jnp.ones(num_tasks, gram.dtype), gram),
      name="gram_probe",
    )
  )


def errors(rows, cols, feats, tasks, offset):
  fun, after_layer, p32, x32, y32 = model(rows, cols, feats, tasks, offset)
  to64 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), t)  # noqa: E731
  p64, x64, y64 = to64(p32), to64(x32), to64(y32)
  k64 = np.asarray(gj.gram_matrix(jax.jacrev(fun)(p64, x64, y64)))
  scale = np.max(np.abs(k64))
  p, x, y = (jax.tree_util.tree_map(jnp.asarray, t) for t in (p32, x32, y32))

  # The uncentred identity, from the layer's activation and output cotangents.
  h = x @ p["w"]
  d = jax.jacrev(after_layer)(h, p, y)  # (T, R, F)
  hi = jax.lax.Precision.HIGHEST
  aa = jnp.matmul(x, x.T, precision=hi)
  k_plain = jnp.einsum("srf,trf->st", d, jnp.einsum("rq,tqf->trf", aa, d, precision=hi))
  k_plain = k_plain + gj.gram_matrix(jax.jacrev(fun)(p, x, y)["head"])  # the head's block

  probe = _probe(tasks)
  out = {"identity, uncentred": k_plain}
  for gram in ("dense", "pullback"):
    step = jax.jit(gj.combined_value_and_grad(fun, probe, gram=gram, on_fallback="raise"))
    out[f'lean, gram="{gram}"'] = step(p, probe.init(p), x, y)[2]
  _, stacked = jax.jit(gj.per_task_value_and_grad(fun, on_fallback="raise"))(p, x, y)
  out["stacked (per_task_value_and_grad)"] = gj.gram_matrix(stacked)
  return {k: float(np.max(np.abs(np.asarray(v, np.float64) - k64)) / scale) for k, v in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  args = parser.parse_args()
  sizes = (16, 32, 8, 3) if args.quick else (64, 256, 32, 4)
  rows, cols, feats, tasks = sizes
  print(
    f"Gram matrix error against float64, max|K - K64| / max|K64|: {rows} rows, "
    f"{cols} input features, {feats} output features, T = {tasks}, batch norm after the layer\n"
  )
  table = {offset: errors(*sizes, offset) for offset in OFFSETS}
  routes = list(next(iter(table.values())))
  print("| route | " + " | ".join(f"offset {o:g}" for o in OFFSETS) + " |")
  print("|---|" + "---:|" * len(OFFSETS))
  for r in routes:
    print(f"| {r} | " + " | ".join(f"{table[o][r]:.1e}" for o in OFFSETS) + " |")


if __name__ == "__main__":
  main()
