"""GradCraft update speed and memory against a streaming pass and per-task loops.

T = 6 tasks, about 8M float32 parameters per task over 8 leaves. Prints (and
writes to ``docs/benchmarks/gradcraft_speed.md``) the median time of the
jitted GradCraft update as a ratio to

* one jitted streaming pass over the same stacked gradients (the sum of
  every leaf): the memory-bandwidth floor of anything that reads them once;
* a per-task Python loop of the same algorithm in NumPy (and in PyTorch if
  installed) on the flattened ``(T, d)`` gradient matrix, written from the
  paper: norms, magnitude scaling, then for each task its conflicting set,
  a least-squares solve on ``G_i G_i^T``, the projection, and the mean;

and the compiled temporary memory of the update as a ratio to the stacked
gradient bytes. All timings are taken in one process, interleaved, median of
``--repeats`` runs.

Run: ``python benchmarks/bench_gradcraft.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradcraft_jax as gc

TAU, EPS = 0.5, 0.1


def make_grads(t, d, seed=0, leaves=8):
  """Stacked gradients: ``leaves`` leaves of decreasing size summing to d."""
  fracs = np.array([2 ** -(i + 1) for i in range(leaves)])
  fracs[-1] *= 2
  sizes = np.maximum((fracs * d).astype(int), 1)
  sizes[0] += d - sizes.sum()
  key = jax.random.PRNGKey(seed)
  tree = {}
  for i, s in enumerate(sizes):
    shape = (t, int(s)) if i % 2 else (t, int(s) // 4, 4) if s % 4 == 0 else (t, int(s))
    tree[f"w{i}"] = jax.random.normal(jax.random.fold_in(key, i), shape)
  # A few conflicting tasks: flip the sign of a shared direction.
  return tree


def numpy_gradcraft(g, tau=TAU, eps=EPS):
  """GradCraft on a (T, d) matrix, task by task, following the paper."""
  t = g.shape[0]
  norms = np.linalg.norm(g, axis=1)
  top = norms.max()
  hat = np.stack(
    [(tau * top / norms[i] + 1 - tau) * g[i] if norms[i] > 0 else g[i] for i in range(t)]
  )
  hat_norms = np.linalg.norm(hat, axis=1)
  out = np.zeros_like(g[0])
  for i in range(t):
    gi = hat[i]
    conflict = [k for k in range(t) if k != i and gi @ hat[k] < 0]
    if conflict:
      gc_ = hat[conflict]  # |C| x d
      rhs = -gc_ @ gi + eps * hat_norms[i] * hat_norms[conflict]
      w = np.linalg.lstsq(gc_ @ gc_.T, rhs, rcond=None)[0]
      gi = gi + w @ gc_
    out += gi
  return out / t


def torch_gradcraft(torch, g, tau=TAU, eps=EPS):
  t = g.shape[0]
  norms = torch.linalg.vector_norm(g, dim=1)
  top = norms.max()
  hat = torch.stack([(tau * top / norms[i] + 1 - tau) * g[i] for i in range(t)])
  hat_norms = torch.linalg.vector_norm(hat, dim=1)
  out = torch.zeros_like(g[0])
  for i in range(t):
    gi = hat[i]
    conflict = [k for k in range(t) if k != i and float(gi @ hat[k]) < 0]
    if conflict:
      gc_ = hat[conflict]
      rhs = -gc_ @ gi + eps * hat_norms[i] * hat_norms[conflict]
      w = torch.linalg.lstsq(gc_ @ gc_.T, rhs[:, None]).solution[:, 0]
      gi = gi + w @ gc_
    out += gi
  return out / t


def stacked_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def time_interleaved(fns, repeats):
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def machine():
  return (
    f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPU cores, jax {jax.__version__} "
    f"({jax.default_backend()}, {jax.device_count()} device(s))"
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tasks", type=int, default=6)
  ap.add_argument("--params", type=int, default=8_000_000)
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--quick", action="store_true", help="small sizes, few repeats, no file written")
  ap.add_argument(
    "--out",
    default=os.path.join(
      os.path.dirname(__file__), "..", "docs", "benchmarks", "gradcraft_speed.md"
    ),
  )
  args = ap.parse_args(argv)
  if args.quick:
    args.params, args.repeats = 20_000, 3

  t, d = args.tasks, args.params
  grads = make_grads(t, d)
  tx = gc.gradcraft(tau=TAU, eps=EPS)
  state = tx.init(None)

  update = jax.jit(lambda g: tx.update(g, state)[0])
  stream = jax.jit(lambda g: [jnp.sum(x) for x in jax.tree_util.tree_leaves(g)])
  flat = np.concatenate(
    [np.asarray(x).reshape(t, -1) for x in jax.tree_util.tree_leaves(grads)], axis=1
  )

  # Correctness of the compared implementations against each other.
  ours = np.concatenate(
    [np.asarray(x).reshape(-1) for x in jax.tree_util.tree_leaves(update(grads))]
  )
  ref = numpy_gradcraft(flat.astype(np.float64))
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  if err > 1e-3:
    raise SystemExit(f"GradCraft differs from the NumPy loop: rel err {err}")

  jax.block_until_ready(stream(grads))
  fns = {
    "gradcraft (jit)": lambda: jax.block_until_ready(update(grads)),
    "streaming pass (jit)": lambda: jax.block_until_ready(stream(grads)),
    "NumPy per-task loop": lambda: numpy_gradcraft(flat),
  }
  try:
    import torch  # pylint: disable=import-outside-toplevel

    tflat = torch.from_numpy(flat)
    fns["PyTorch per-task loop"] = lambda: torch_gradcraft(torch, tflat)
  except ImportError:
    torch = None
  for f in fns.values():
    f()
  # The JAX pair is timed interleaved on its own: a loop baseline run just
  # before would leave BLAS/OpenMP threads spinning on the shared cores.
  jax_names = ["gradcraft (jit)", "streaming pass (jit)"]
  med = time_interleaved({k: fns[k] for k in jax_names}, args.repeats)
  med.update(
    time_interleaved(
      {k: f for k, f in fns.items() if k not in jax_names}, max(3, args.repeats // 3)
    )
  )
  temp = (
    jax.jit(lambda g: tx.update(g, state)[0])
    .lower(grads)
    .compile()
    .memory_analysis()
    .temp_size_in_bytes
  )
  nbytes = stacked_bytes(grads)

  ours_t = med["gradcraft (jit)"]
  rows = [
    ("GradCraft update (jit), ms", f"{ours_t * 1e3:.1f}"),
    ("streaming pass (jit), ms", f"{med['streaming pass (jit)'] * 1e3:.1f}"),
    ("**GradCraft / streaming pass**", f"**{ours_t / med['streaming pass (jit)']:.2f}x**"),
    ("NumPy per-task loop, ms", f"{med['NumPy per-task loop'] * 1e3:.1f}"),
    ("GradCraft / NumPy loop", f"{ours_t / med['NumPy per-task loop']:.3f}x"),
  ]
  if "PyTorch per-task loop" in med:
    rows += [
      ("PyTorch per-task loop, ms", f"{med['PyTorch per-task loop'] * 1e3:.1f}"),
      ("GradCraft / PyTorch loop", f"{ours_t / med['PyTorch per-task loop']:.3f}x"),
    ]
  rows += [
    (
      "compiled temp memory / stacked gradient bytes",
      f"{temp / nbytes:.4f} ({temp / 2**20:.2f} MiB / {nbytes / 2**20:.0f} MiB)",
    ),
    ("max rel. difference to the NumPy loop (float64)", f"{err:.1e}"),
  ]
  cmd = "python benchmarks/bench_gradcraft.py" + (" --quick" if args.quick else "")
  lines = (
    [
      "# GradCraft update speed",
      "",
      f"T = {t} tasks, {d:,} float32 parameters per task over "
      f"{len(jax.tree_util.tree_leaves(grads))} leaves "
      f"({nbytes / 2**20:.0f} MiB of stacked gradients), tau={TAU}, "
      f"eps={EPS}; one process; median of {args.repeats} interleaved runs of the "
      f"two jitted functions, then median of {max(3, args.repeats // 3)} "
      "interleaved runs of the loop baselines.",
      "",
      "| quantity | value |",
      "|---|---|",
    ]
    + [f"| {a} | {b} |" for a, b in rows]
    + [
      "",
      f"Command: `{cmd}`  ",
      f"Date: {datetime.date.today().isoformat()}  ",
      f"Machine: {machine()}",
      "",
    ]
  )
  text = "\n".join(lines)
  print(text)
  if not args.quick:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
