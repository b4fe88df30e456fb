"""The library's lean step next to a lean step written by hand for one model.

On the shared-bottom ranking model of ``benchmarks/bench_recsys_step.py``
(user and item id tables of ``V`` x 32, the history read from the item table,
side tables, dense features, stacked towers; batch 1,024), one jitted float32
training step (gradients, method, Adam, apply) per variant:

* ``plain``: ``jax.grad`` of the summed losses + Adam (the reference, 1x);
* ``lean``: ``combined_value_and_grad(loss, method)`` + Adam: the library's
  general route, which finds the tables, towers and dense layers in the
  model's jaxpr;
* ``hand-written``: ``benchmarks/recsys_handwritten.py``, the same algebra
  written for this one model (lookups as explicit inputs, per-id sums of the
  lookups' cotangents for the table blocks, stacked gradients for the dense
  leaves).

Times are medians of ``--rounds`` interleaved rounds (compilation excluded)
as ratios to the plain step of the same cell; memory is the compiled
temporary memory (``memory_analysis().temp_size_in_bytes``). This machine
may be shared: compare ratios within a cell.

Usage::

    python benchmarks/bench_recsys_handwritten.py [--vocab 50000 500000 2000000]
        [--tasks 8] [--methods gradcraft] [--rounds 7] [--out FILE.md] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_recsys_step as brs  # noqa: E402
import recsys_handwritten as hw  # noqa: E402
import recsys_models as rm  # noqa: E402
import run_meta  # noqa: E402

MIB = 2.0**20


def run_cell(vocab, t, args):
  cfg = brs.model_config("shared_bottom", vocab, t, args.quick)
  graphdef, params = rm.init(cfg, seed=0)
  loss_fn = rm.make_loss_fn(graphdef)
  batch = rm.make_batch_fn(cfg)(0, args.batch)
  variants, adam_state = brs.jax_variants(loss_fn, params, args.methods)
  steps = {"plain": (variants["plain"][0], (params, adam_state, None, batch))}
  pure = nnx.to_pure_dict(params)
  adam = optax.adam(1e-3)
  pure_adam = adam.init(pure)
  for name in args.methods:
    fn, extra = variants[f"lean {name}"]
    steps[f"lean {name}"] = (fn, (params, adam_state, extra, batch))
    method = brs.jax_method(name)
    steps[f"hand {name}"] = (
      hw.make_step(cfg, method, adam),
      (pure, pure_adam, method.init(pure), batch),
    )
  compiled = brs.compile_steps(steps)
  calls, temp = {}, {}
  for name, (exe, temp[name], _) in compiled.items():
    args_ = steps[name][1]
    calls[name] = lambda exe=exe, a=args_: jax.block_until_ready(exe(*a))
  times, _, errors = brs.interleaved(calls, args.rounds, slow_s=float("inf"))
  return dict(vocab=vocab, t=t, times=times, temp=temp, errors=errors)


def rows(cell, methods):
  out = []
  ref = cell["times"].get("plain")
  for name in methods:
    lean, hand = cell["times"].get(f"lean {name}"), cell["times"].get(f"hand {name}")
    m = cell["temp"]
    out.append(
      f"| {cell['vocab']:,} | {cell['t']} | {name} | {1e3 * ref:.1f} | "
      f"{lean / ref:.2f}x | {hand / ref:.2f}x | {lean / hand:.2f} | "
      f"{m['plain'] / MIB:.1f} | {m[f'lean {name}'] / MIB:.1f} | {m[f'hand {name}'] / MIB:.1f} |"
    )
  return out


HEAD = (
  "| V | T | method | plain (ms) | lean | hand-written | lean / hand-written | "
  "temp MiB plain | temp MiB lean | temp MiB hand-written |\n"
  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, nargs="+", default=None)
  ap.add_argument("--tasks", type=int, nargs="+", default=[8])
  ap.add_argument("--methods", nargs="+", default=["gradcraft"], choices=brs.METHODS)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
  ap.add_argument("--out", default=None, help="write a Markdown page here")
  args = ap.parse_args(argv)
  if args.vocab is None:
    args.vocab = [1_000] if args.quick else [50_000, 500_000, 2_000_000]
  if args.batch is None:
    args.batch = 64 if args.quick else 1024
  if args.quick:
    args.rounds = min(args.rounds, 2)
  start = time.perf_counter()
  lines = [HEAD]
  print(HEAD, flush=True)
  for vocab in args.vocab:
    for t in args.tasks:
      cell = run_cell(vocab, t, args)
      if cell["errors"]:
        raise RuntimeError(f"V={vocab}, T={t}: {cell['errors']}")
      for line in rows(cell, args.methods):
        print(line, flush=True)
        lines.append(line)
  minutes = (time.perf_counter() - start) / 60
  print(f"total {minutes:.1f} min")
  if args.out:
    meta = run_meta.metadata(
      "benchmarks/bench_recsys_handwritten.py", sys.argv[1:] if argv is None else argv
    )
    meta["machine"] = run_meta.bench_machine(torch=False).split("; PyTorch")[0]
    doc = ["# Ranking model: the library's lean step and a hand-written one", ""]
    doc += [f"- {k}: {v}" for k, v in meta.items()] + [f"- run time: {minutes:.1f} min", ""]
    doc += [
      brs.describe(argparse.Namespace(models=["shared_bottom"], batch=args.batch)),
      "",
      "One jitted float32 training step per variant (gradients, method, Adam, apply): "
      "`plain` is `jax.grad` of the summed losses; `lean` is the library's "
      "`combined_value_and_grad(loss, method)`; `hand-written` is "
      "`benchmarks/recsys_handwritten.py`, the same algebra written for this one model. "
      f"Times: median of {args.rounds} interleaved rounds as ratios to the plain step of "
      "the row; `lean / hand-written`: the library's time over the hand-written step's. "
      "Temporary memory: `memory_analysis().temp_size_in_bytes` of the compiled step.",
      "",
      *lines,
      "",
    ]
    with open(args.out, "w") as f:
      f.write("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
