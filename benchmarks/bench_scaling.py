"""Scaling of the multi-task transforms with tasks and parameters.

(a) Every Gram-based transform exported by ``gradcraft_jax`` (discovered at
    run time) at ``T = 6`` and about 8M float32 parameters per task over 8
    leaves, as a ratio to one jitted streaming pass over the same stacked
    gradients (``tree_map(jnp.sum, g)``, the memory-bandwidth floor of
    anything that reads them once). A Gram-based update reads them twice
    (Gram, weighted sum) and writes one parameter-sized output. Also the
    Gram matrix alone: ``gram_matrix`` (the compiled CPU kernel when built)
    and the pure-XLA blocked loop it otherwise uses.
(b) GradCraft and ``mean`` for ``T`` in {2, 6, 16, 32, 64} at 1M parameters
    per task, and for 1M / 8M / 32M parameters at ``T = 6`` (combinations
    whose stacked gradients exceed ``--max-gb`` are skipped).

Each method is timed in its own block after warm-up, interleaved with the
streaming pass (median of ``--repeats`` runs with ``block_until_ready``):
the machine is shared, so the ratio measured in the same block is what
matters. Writes ``docs/benchmarks/scaling.md`` and ``scaling.png``.

Run: ``python benchmarks/bench_scaling.py`` (``--quick`` for a smoke run
that writes nothing).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradcraft_jax
from gradcraft_jax import _cpu_gram, _stacked

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "benchmarks")
SKIP = ("from_weighting", "train_prioritized")


def discover(t):
  """``{name: transform}`` for every public transform factory."""
  fill = {"num_tasks": t, "targets": [0.5] * (t - 1), "lagrange_lr": 0.1, "lagrange_clip": 10.0}
  methods = getattr(gradcraft_jax, "methods", None)
  names = list(gradcraft_jax.__all__)
  names += [n for n in getattr(methods, "__all__", ()) if n not in names]
  out = {}
  for name in names:
    obj = getattr(gradcraft_jax, name, None) or getattr(methods, name, None)
    if obj is None or inspect.isclass(obj) or not callable(obj) or name in SKIP:
      continue
    try:
      params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
      continue
    kwargs = {}
    if any(
      p.name not in fill
      and p.default is p.empty
      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
      for p in params
    ):
      continue
    kwargs = {p.name: fill[p.name] for p in params if p.name in fill}
    try:
      tx = obj(**kwargs)
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(tx, optax.GradientTransformation):
      out[name] = tx
  return out


def make_grads(t, d, seed=0, leaves=8):
  """Stacked gradients: ``leaves`` leaves of decreasing size summing to d."""
  fracs = np.array([2.0 ** -(i + 1) for i in range(leaves)])
  fracs[-1] *= 2
  sizes = np.maximum((fracs * d).astype(int), 1)
  sizes[0] += d - sizes.sum()
  key = jax.random.PRNGKey(seed)
  return {
    f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (t, int(s))) for i, s in enumerate(sizes)
  }


_stream = jax.jit(lambda g: jax.tree_util.tree_map(jnp.sum, g))


def time_pair(update, grads, repeats):
  """Median seconds of ``update`` and of the streaming pass, interleaved."""
  jax.block_until_ready(update(grads))
  jax.block_until_ready(_stream(grads))
  a, b = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(update(grads))
    a.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(_stream(grads))
    b.append(time.perf_counter() - t0)
  return float(np.median(a)), float(np.median(b))


def jitted_update(tx, t):
  losses = jnp.linspace(1.0, 2.0, t)
  state = tx.init(None)
  return jax.jit(lambda g: tx.update(g, state, None, task_losses=losses)[0])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--max-gb", type=float, default=3.0)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  if args.quick:
    d_a, tasks, d_b, params_list, args.repeats = 20_000, [2, 6], 10_000, [10_000, 40_000], 3
  else:
    d_a, tasks, d_b, params_list = (
      8_000_000,
      [2, 6, 16, 32, 64],
      1_000_000,
      [1_000_000, 8_000_000, 32_000_000],
    )

  # (a) every method at T = 6.
  t = 6
  grads = make_grads(t, d_a)
  rows_a = []
  transforms = discover(t)
  if args.quick:  # smoke run: every factory built, a few compiled
    transforms = {
      k: v for k, v in transforms.items() if k in ("gradcraft", "mean", "nmt", "upgrad")
    }
  for name, tx in transforms.items():
    try:
      ms, ss = time_pair(jitted_update(tx, t), grads, args.repeats)
    except Exception as e:  # pylint: disable=broad-except
      rows_a.append((name, float("nan"), float("nan"), f"error: {e!r:.80}"))
      continue
    target = 3.0 if name == "gradcraft" else 4.0
    rows_a.append(
      (name, ms * 1e3, ss * 1e3, "yes" if ms / ss <= target else f"no (target {target:g}x)")
    )
    print(f"{name}: {ms * 1e3:.1f} ms, stream {ss * 1e3:.1f} ms, {ms / ss:.2f}x", flush=True)
  # The Gram matrix alone: what gram_matrix uses here (the compiled CPU
  # kernel when it is built) and the pure-XLA blocked loop it falls back to.
  xla_gram = jax.jit(
    lambda g: sum(
      _stacked._leaf_gram_blocked(x, jnp.float32)  # pylint: disable=protected-access
      for x in jax.tree_util.tree_leaves(g)
    )
  )
  kernel = "compiled kernel" if _cpu_gram.available() else "no kernel"
  rows_gram = []
  for label, fn in (
    (f"gram_matrix ({kernel})", jax.jit(gradcraft_jax.gram_matrix)),
    ("XLA blocked loop", xla_gram),
  ):
    ms, ss = time_pair(fn, grads, args.repeats)
    rows_gram.append((label, ms * 1e3, ss * 1e3))
    print(f"{label}: {ms * 1e3:.1f} ms, stream {ss * 1e3:.1f} ms, {ms / ss:.2f}x", flush=True)
  del grads

  # (b) GradCraft and mean vs T and vs parameters.
  rows_b = []
  combos = [(tt, d_b) for tt in tasks] + [(6, d) for d in params_list if d != d_b]
  for tt, d in combos:
    if tt * d * 4 > args.max_gb * 2**30:
      rows_b.append((tt, d, None, None, None))
      continue
    grads = make_grads(tt, d)
    res = {}
    for name in ("gradcraft", "mean"):
      fac = getattr(gradcraft_jax, name)
      ms, ss = time_pair(jitted_update(fac(), tt), grads, args.repeats)
      res[name] = (ms, ss)
    rows_b.append((tt, d, res["gradcraft"], res["mean"], tt * d * 4 / 2**20))
    print(
      f"T={tt} d={d}: "
      + ", ".join(f"{k} {v[0] * 1e3:.1f} ms ({v[0] / v[1]:.2f}x)" for k, v in res.items()),
      flush=True,
    )
    del grads

  lines = ["# Scaling with tasks and parameters", ""]
  lines += [
    f"(a) Every transform in `gradcraft_jax`, T = {t}, {d_a:,} float32 "
    "parameters per task over 8 leaves "
    f"({t * d_a * 4 / 2**20:.0f} MiB of stacked gradients). Each "
    "method timed in its own block after warm-up, interleaved with a "
    "jitted streaming pass (`tree_map(jnp.sum, g)`); median of "
    f"{args.repeats} runs. Targets: GradCraft <= 3x, others <= 4x.",
    "",
    "| method | update ms | streaming pass ms | ratio | within target |",
    "|---|---|---|---|---|",
  ]
  for name, ms, ss, ok in rows_a:
    lines.append(f"| {name} | {ms:.1f} | {ss:.1f} | {ms / ss:.2f}x | {ok} |")
  lines += [
    "",
    "The Gram matrix alone, same gradients, same way:",
    "",
    "| Gram matrix | ms | streaming pass ms | ratio |",
    "|---|---|---|---|",
  ]
  for label, ms, ss in rows_gram:
    lines.append(f"| {label} | {ms:.1f} | {ss:.1f} | {ms / ss:.2f}x |")
  lines += [
    "",
    f"(b) GradCraft and mean vs T at {d_b:,} parameters per task "
    "and vs parameters at T = 6 (ratio to the streaming pass in the "
    "same block).",
    "",
    "| T | params/task | stacked MiB | GradCraft ms | ratio | mean ms | ratio |",
    "|---|---|---|---|---|---|---|",
  ]
  for tt, d, g, m, mib in rows_b:
    if g is None:
      lines.append(f"| {tt} | {d:,} | skipped (> {args.max_gb} GB) | | | | |")
      continue
    lines.append(
      f"| {tt} | {d:,} | {mib:.0f} | {g[0] * 1e3:.1f} | "
      f"{g[0] / g[1]:.2f}x | {m[0] * 1e3:.1f} | {m[0] / m[1]:.2f}x |"
    )
  lines += [
    "",
    "Command: `python benchmarks/bench_scaling.py`  ",
    f"Date: {datetime.date.today().isoformat()}  ",
    f"Machine: {platform.machine()}, {os.cpu_count()}-core CPU, "
    f"jax {jax.__version__} "
    f"({jax.default_backend()}, {jax.device_count()} device(s))",
    "",
  ]
  text = "\n".join(lines)
  print(text)
  if args.quick:
    return
  os.makedirs(DOCS, exist_ok=True)
  with open(os.path.join(DOCS, "scaling.md"), "w") as f:
    f.write(text)
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  vs_t = [r for r in rows_b if r[1] == d_b and r[2] is not None]
  vs_d = [r for r in rows_b if r[0] == 6 and r[2] is not None]
  vs_d.sort(key=lambda r: r[1])
  for ax, rows, xi, xlabel in (
    (axes[0], vs_t, 0, "tasks T"),
    (axes[1], vs_d, 1, "parameters per task"),
  ):
    x = [r[xi] for r in rows]
    ax.loglog(x, [r[2][0] * 1e3 for r in rows], "o-", label="GradCraft")
    ax.loglog(x, [r[3][0] * 1e3 for r in rows], "s-", label="mean")
    ax.loglog(x, [r[2][1] * 1e3 for r in rows], "k--", label="streaming pass")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time per update (ms)")
    ax.legend()
  t_values = [r[0] for r in vs_t]
  axes[0].set_xticks(t_values, [str(t) for t in t_values])
  axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes[0].set_title(f"{d_b:,} params/task")
  axes[1].set_title("T = 6")
  fig.tight_layout()
  fig.savefig(os.path.join(DOCS, "scaling.png"), dpi=110)


if __name__ == "__main__":
  main()
