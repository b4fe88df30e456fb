"""Representation-level vs full per-task gradients on the Census SharedBottom.

Compiled temporary bytes (XLA's memory analysis) and median time of one
jitted gradient computation at batch 1024 (``--batch``):

* full: ``per_task_value_and_grad`` over all parameters, then the GradCraft
  update on the stacked gradients;
* representation: :func:`gradcraft_jax.representation_value_and_grad` with
  GradCraft (per-task gradients w.r.t. the shared-bottom output only, one
  weighted backward pass).

Writes ``docs/benchmarks/representation.md`` (``--quick``: smaller batch,
nothing written).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

import gradcraft_jax
from gradcraft_jax.datasets import load_census_income

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mtl_models  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  if args.quick:
    args.batch, args.repeats = 128, 3
  data = load_census_income(max_rows=max(4 * args.batch, 2000))
  model = mtl_models.SharedBottom(
    data.cardinalities, data.num_numeric, data.num_tasks, rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(model)
  loss_fn = mtl_models.make_loss_fn(graphdef)
  batch = {k: v[: args.batch] for k, v in data.train.as_dict().items()}
  tx = gradcraft_jax.gradcraft()
  state = tx.init(params)

  def full(p, b):
    losses, g = gradcraft_jax.per_task_value_and_grad(loss_fn)(p, b)
    upd, _ = tx.update(g, state, p, task_losses=losses)
    return losses, upd

  def encoder(p, b):
    return nnx.merge(graphdef, p).representation(b["cat"], b["num"])

  def heads(p, z, b):
    m = nnx.merge(graphdef, p)
    return mtl_models.bce_task_losses(lambda cat, num: m.head(z), b)

  rep_fn = gradcraft_jax.representation_value_and_grad(encoder, heads, tx)

  def rep(p, b):
    losses, g, _, _ = rep_fn(p, state, b)
    return losses, g

  rows = []
  for name, f in (
    ("full per-task gradients + GradCraft", full),
    ("representation-level (MGDA-UB style) + GradCraft", rep),
  ):
    jf = jax.jit(f)
    mem = jf.lower(params, batch).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan"))
    jax.block_until_ready(jf(params, batch))
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(jf(params, batch))
      ts.append(time.perf_counter() - t0)
    rows.append((name, temp / 2**20, float(np.median(ts)) * 1e3))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  lines = [
    "# Representation-level vs full per-task gradients",
    "",
    f"Census SharedBottom ({n_params:,} parameters, T = 3), batch "
    f"{args.batch}; one jitted gradient computation (median of "
    f"{args.repeats} runs).",
    "",
    "| variant | compiled temp MiB | time ms |",
    "|---|---|---|",
  ]
  lines += [f"| {n} | {m:.2f} | {t:.2f} |" for n, m, t in rows]
  lines += [
    "",
    "Command: `python benchmarks/bench_representation.py`  ",
    f"Date: {datetime.date.today().isoformat()}  ",
    f"Machine: {platform.machine()}, {os.cpu_count()}-core CPU shared "
    f"with other jobs, jax {jax.__version__}",
    "",
  ]
  text = "\n".join(lines)
  print(text)
  if not args.quick:
    with open(os.path.join(HERE, "..", "docs", "benchmarks", "representation.md"), "w") as fh:
      fh.write(text)


if __name__ == "__main__":
  main()
