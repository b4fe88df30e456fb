"""Update time of gradcraft-jax methods next to torchjd's aggregators.

For every method both libraries implement, and T in {2, 6, 16, 32} tasks of
``--dim`` parameters each (default 1M): the jitted JAX transform's
``update`` on a stacked ``(T, dim)`` float32 gradient (median of
``--repeats`` runs, ``block_until_ready``) next to torchjd's aggregator on
the same ``(T, dim)`` matrix (``torch.set_num_threads(2)``, median of runs).
Prints a Markdown table and writes it (with command, date and machine) to
``--out`` (default ``docs/benchmarks/vs_torchjd.md``).

Usage::

    python benchmarks/bench_vs_torchjd.py [--dim 1000000] [--tasks 2 6 16 32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import gradcraft_jax.methods as gm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_meta  # noqa: E402

warnings.filterwarnings("ignore")


def jax_methods():
  """name -> factory(T); only what exists in this checkout."""
  table = {
    "mean": lambda t: gm.mean(),
    "mgda": lambda t: gm.mgda(),
    "imtl_g": lambda t: gm.imtl_g(),
    "cagrad": lambda t: gm.cagrad(0.4),
    "upgrad": lambda t: gm.upgrad(),
    "aligned_mtl": lambda t: gm.aligned_mtl(),
    "pcgrad": lambda t: gm.pcgrad(seed=0),
    "gradvac": lambda t: gm.gradvac(0.5, num_tasks=t),
    "nash_mtl": lambda t: gm.nash_mtl(),
    "rlw": lambda t: gm.rlw(seed=0),
    "constant": lambda t: gm.constant(jnp.ones(t)),
    "cr_mogm": lambda t: gm.cr_mogm(gm.upgrad(), 0.9, num_tasks=t),
    # Krum is left out: it needs T >= 3 and the default task list starts at 2.
    "fairgrad": lambda t: gm.fairgrad(1.0),
    "conflict_free": lambda t: gm.conflict_free(),
    "dualproj": lambda t: gm.dualproj(),
    "trimmed_mean": lambda t: gm.trimmed_mean((t - 1) // 4),
    "graddrop": lambda t: gm.graddrop(),
    "excess_mtl": lambda t: gm.excess_mtl(num_tasks=t),
  }
  return {k: v for k, v in table.items() if hasattr(gm, k)}


def torchjd_methods():
  import torchjd.aggregation as ta  # pylint: disable=import-outside-toplevel

  return {
    "mean": lambda t: ta.Mean(),
    "mgda": lambda t: ta.MGDA(),
    "imtl_g": lambda t: ta.IMTLG(),
    "cagrad": lambda t: ta.CAGrad(c=0.4),
    "upgrad": lambda t: ta.UPGrad(),
    "aligned_mtl": lambda t: ta.AlignedMTL(),
    "pcgrad": lambda t: ta.PCGrad(),
    "gradvac": lambda t: ta.GradVac(),
    "nash_mtl": lambda t: ta.NashMTL(n_tasks=t, max_norm=0.0),
    "rlw": lambda t: ta.Random(),
    "constant": lambda t: ta.Sum(),
    "cr_mogm": lambda t: ta.GramianWeightedAggregator(
      ta.CRMOGMWeighting(ta.UPGradWeighting(), alpha=0.9)
    ),
    "fairgrad": lambda t: ta.FairGrad(alpha=1.0),
    "conflict_free": lambda t: ta.ConFIG(),
    "dualproj": lambda t: ta.DualProj(),
    "trimmed_mean": lambda t: ta.TrimmedMean(trim_number=(t - 1) // 4),
    "graddrop": lambda t: ta.GradDrop(),
    "excess_mtl": lambda t: ta.ExcessMTL(),
  }


def median_time(fn, repeats, budget_s):
  """Median wall time of ``fn()`` (two warm-up calls first); stops early
  once ``budget_s`` seconds of runs are spent."""
  fn()
  fn()
  times = []
  start = time.perf_counter()
  # At least `repeats` runs, and for fast cells keep going until 0.5 s of
  # runs (at most 200) so that the median is not one noisy sample.
  while len(times) < 200:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    if elapsed > budget_s or (len(times) >= repeats and elapsed > 0.5):
      break
  return statistics.median(times), len(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=1_000_000)
  parser.add_argument("--tasks", type=int, nargs="+", default=[2, 6, 16, 32])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument(
    "--budget", type=float, default=20.0, help="seconds of timed runs per cell at most"
  )
  parser.add_argument("--methods", nargs="+", default=None)
  parser.add_argument("--out", default="docs/benchmarks/vs_torchjd.md")
  args = parser.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(2)
  jm, tm = jax_methods(), torchjd_methods()
  names = [n for n in (args.methods or list(jm)) if n in jm and n in tm]

  rows = []
  for t in args.tasks:
    rng = np.random.default_rng(t)
    mat = rng.standard_normal((t, args.dim)).astype(np.float32)
    mat[1] -= 0.5 * mat[0]  # some conflict, so projections do work
    g = {"w": jnp.asarray(mat)}
    params = {"w": jnp.zeros((args.dim,), jnp.float32)}
    tmat = torch.from_numpy(mat)
    for name in names:
      tx = jm[name](t)
      state = tx.init(params)
      update = jax.jit(tx.update)

      def run_jax():
        out, _ = update(g, state, params)
        jax.block_until_ready(out)

      t_jax, n_jax = median_time(run_jax, args.repeats, args.budget)
      agg = tm[name](t)

      def run_torch():
        with torch.no_grad():
          agg(tmat)

      try:
        t_torch, n_torch = median_time(run_torch, args.repeats, args.budget)
      except Exception as exc:  # pylint: disable=broad-except
        print(f"torchjd {name} T={t} failed: {exc!r}", file=sys.stderr)
        t_torch, n_torch = float("nan"), 0
      rows.append((name, t, t_jax, t_torch, n_jax, n_torch))
      print(
        f"{name:12s} T={t:3d} jax {1e3 * t_jax:9.2f} ms  torchjd "
        f"{1e3 * t_torch:9.2f} ms  x{t_torch / t_jax:7.2f}",
        flush=True,
      )

  lines = [
    "| method | T | gradcraft-jax (ms) | torchjd (ms) | speed-up |",
    "|---|---:|---:|---:|---:|",
  ]
  slower = []
  for name, t, tj, tt, _, _ in sorted(rows, key=lambda r: (names.index(r[0]), r[1])):
    ratio = tt / tj
    flag = " (slower)" if ratio < 1 else ""
    if ratio < 1:
      slower.append(f"{name} T={t}")
    lines.append(f"| {name} | {t} | {1e3 * tj:.2f} | {1e3 * tt:.2f} | {ratio:.2f}x{flag} |")
  table = "\n".join(lines)
  print()
  print(table)
  cmd = "python " + " ".join(
    [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])
  )
  doc = [
    "# gradcraft-jax vs torchjd: update time",
    "",
    f"Command: `{cmd}`  ",
    f"Date: {datetime.date.today().isoformat()}  ",
    f"Commit: {run_meta.commit()}  ",
    f"Machine: {run_meta.bench_machine()}",
    "",
    f"One update of a `(T, {args.dim})` float32 gradient matrix: the "
    "jitted JAX transform (median of runs, `block_until_ready`, "
    "compilation excluded) next to torchjd's aggregator on the same "
    "matrix (`torch.set_num_threads(2)`, median of runs, two warm-up "
    "calls each). Speed-up = torchjd time / JAX time. The machine is "
    "shared, so absolute times are noisy; the ratios were measured in "
    "one run. Settings: CAGrad c=0.4, GradVac beta=0.5, NashMTL "
    "max_norm=0 (torchjd) / default (ours), everything else default.",
    "",
    table,
    "",
  ]
  if slower:
    doc.append("JAX slower in: " + ", ".join(slower) + ".")
  else:
    doc.append("JAX is faster in every cell.")
  doc.append("")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(doc))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
