"""Training steps of ranking models with embedding tables: plain, stacked, lean, torchjd.

For each model (``benchmarks/recsys_models.py``: shared-bottom, MMoE, PLE, with
user and item id tables of ``V`` rows x 32, a history feature read from the
item table, two small categorical features, dense features and one tower per
task), table size ``V`` and task count ``T``, one jitted float32 training
step (gradients + method + Adam + apply, batch 1,024) per path:

* ``plain``: ``jax.grad`` of the summed losses + Adam (the reference, 1x);
* ``stacked``: ``per_task_value_and_grad`` + ``optax.chain(method, adam)``;
* ``lean``: ``combined_value_and_grad(loss, method)`` + Adam;

for GradCraft, UPGrad, MGDA and mean, with the time per step as a ratio to the
plain step (all variants of a (model, V, T) cell timed interleaved: one call
of each per round, median over rounds, compilation excluded) and the compiled
temporary memory (``jit(step).lower(...).compile().memory_analysis()``).

Next to them, the same model in PyTorch (``benchmarks/recsys_models_torch.py``,
``nn.Embedding`` tables, the same initial weights; CPU,
``torch.set_num_threads(2)``), one ``torch.optim.Adam`` step after: a plain
step, torchjd's ``autojac`` (``backward`` of the losses + ``jac_to_grad`` with
the aggregator; ``optimize_gramian_computation=True`` for UPGrad and MGDA,
which sums per-parameter Gramians instead of concatenating the Jacobians) and
``autogram`` (``Engine(model, batch_dim=None).compute_gramian`` + weighting +
one weighted backward), as ratios to the PyTorch plain step. torchjd has no
GradCraft.

Memory guard: before a variant runs, its peak is estimated (what the cell
holds: JAX parameters and Adam state, the PyTorch model, its gradients and
Adam state; plus the variant's own: the compiled temporary and output memory
of a JAX step, or the Jacobians torchjd holds, about ``T x P`` for
``autojac`` and four ``T x`` the largest table for ``autogram``); a variant whose estimate exceeds
``--mem-budget-gib`` (16) is not run and its cell says ``out of memory
(estimated X GiB)``. The stacked step is not even compiled where its ``T x P``
stacked gradients alone exceed the budget.

Time guard: a variant whose first call takes longer than ``--slow-s`` (1 s) is
timed by that call alone (marked ``*``; a first call also pays for first
touches of fresh memory, so these are upper bounds), the others by the median
of ``--rounds`` (3) interleaved rounds after it. The plain steps, the
references of the ratios, always take the rounds.

The full default grid (3 models x V in {50k, 500k, 2M} x T in {2, 8, 16} x 4
methods, 27 cells) took 27 minutes on a quiet 2-core CPU: per
cell, 9 JAX steps to compile (two at a time) and a few calls of each variant,
one call only for the multi-second steps that form ``T`` dense copies of the
tables; the run prints its total time (and writes it with ``--out``).
``--models``, ``--vocab``, ``--tasks`` and ``--methods`` run a part of it.
``--quick``: tiny sizes (a smoke test, about a minute).

Usage::

    python benchmarks/bench_recsys_step.py [--quick] [--models shared_bottom mmoe ple]
        [--vocab 50000 500000 2000000] [--tasks 2 8 16] [--methods gradcraft upgrad mgda mean]
        [--rounds 3] [--no-torch] [--out docs/benchmarks/recsys_step.md]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import optax

import gradcraft_jax as gj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recsys_models as rm  # noqa: E402
import run_meta  # noqa: E402

warnings.filterwarnings("ignore")

METHODS = ("gradcraft", "upgrad", "mgda", "mean")
MODELS = rm.MODELS
GIB = 2.0**30
MIB = 2.0**20

# Architectures of the benchmark (the tables and features are RecsysConfig's
# defaults: user and item tables of V x 32, history of 10 item ids, side
# tables of 1,000 and 24 rows x 8, 8 dense features).
FULL = {
  "shared_bottom": dict(bottom=(256, 256), tower=(64,)),
  "mmoe": dict(n_experts=4, expert=(256, 128), tower=(64,)),
  "ple": dict(n_experts=2, n_task_experts=1, n_levels=2, expert=(128, 64), tower=(64,)),
}
QUICK = dict(
  embed_dim=8,
  side_vocab=(10, 4),
  side_dim=4,
  history_len=4,
  num_dense=4,
  bottom=(32, 32),
  n_experts=2,
  expert=(32, 16),
  tower=(8,),
)


def model_config(model: str, vocab: int, t: int, quick: bool) -> rm.RecsysConfig:
  sizes = dict(FULL[model])
  if quick:
    sizes.update(QUICK)
  return rm.RecsysConfig(model=model, vocab=vocab, num_tasks=t, **sizes)


def jax_method(name: str):
  return {
    "gradcraft": lambda: gj.gradcraft(0.5, 0.1),
    "upgrad": gj.upgrad,
    "mgda": gj.mgda,
    "mean": gj.mean,
  }[name]()


# ---------------------------------------------------------------- JAX steps


def jax_variants(loss_fn, params, methods):
  """name -> (step, extra state) for the JAX variants of a cell; every step is
  ``step(params, adam_state, extra, batch)``, so all of them share one Adam
  state (the large part, ``2 x P``)."""
  adam = optax.adam(1e-3)
  out = {}

  def plain(p, adam_s, extra, batch):
    del extra
    g = jax.grad(lambda p: jnp.sum(loss_fn(p, batch)))(p)
    upd, adam_s = adam.update(g, adam_s, p)
    return optax.apply_updates(p, upd), adam_s

  out["plain"] = (plain, None)
  per_task = gj.per_task_value_and_grad(loss_fn)
  for name in methods:
    method = jax_method(name)
    tx = optax.chain(method, adam)

    def stacked(p, adam_s, method_s, batch, tx=tx):
      losses, g = per_task(p, batch)
      upd, (method_s, adam_s) = tx.update(g, (method_s, adam_s), p, task_losses=losses)
      return optax.apply_updates(p, upd), adam_s, method_s

    lean_fn = gj.combined_value_and_grad(loss_fn, method)

    def lean(p, adam_s, method_s, batch, lean_fn=lean_fn):
      _, g, method_s = lean_fn(p, method_s, batch)
      upd, adam_s = adam.update(g, adam_s, p)
      return optax.apply_updates(p, upd), adam_s, method_s

    out[f"stacked {name}"] = (stacked, method.init(params))
    out[f"lean {name}"] = (lean, method.init(params))
  return out, adam.init(params)


def compile_steps(steps, workers=2):
  """name -> (compiled, temporary bytes, transient bytes = temporary + outputs)
  for ``steps``: name -> (fn, args). Traced one after the other, compiled by
  ``workers`` threads (XLA compiles outside Python's lock)."""
  lowered = {name: jax.jit(fn).lower(*args) for name, (fn, args) in steps.items()}
  with ThreadPoolExecutor(workers) as pool:
    compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
  out = {}
  for name, exe in compiled.items():
    try:
      ma = exe.memory_analysis()
      temp = ma.temp_size_in_bytes
      transient = temp + ma.output_size_in_bytes - ma.alias_size_in_bytes
    except Exception:  # pylint: disable=broad-except
      temp = transient = float("nan")
    out[name] = (exe, temp, transient)
  return out


# ---------------------------------------------------------------- PyTorch


def torchjd_pair(name):
  """(aggregator, weighting) of torchjd for a method, or None where it has none."""
  import torchjd.aggregation as ta  # pylint: disable=import-outside-toplevel

  return {
    "mean": (ta.Mean(), ta.MeanWeighting()),
    "upgrad": (ta.UPGrad(), ta.UPGradWeighting()),
    "mgda": (ta.MGDA(), ta.MGDAWeighting()),
  }.get(name)


def torch_estimates(cfg: rm.RecsysConfig, p_total: int, methods) -> dict:
  """name -> estimated bytes a torchjd variant holds beyond the cell's
  resident memory (float32): ``autojac`` the ``.jac`` of every parameter
  (``T x P``) and the batched backward of the item table (read twice: two
  ``T x V x D`` cotangent scatters); ``autogram`` one module's Jacobian at a
  time, the largest a table: four ``T x V x D`` (the item table's two uses,
  their sum and the batched backward's scatter). Measured peaks (resident set,
  shared-bottom, V = 200,000, T = 8): 0.90x (autojac UPGrad), 0.97x (autojac
  Mean) and 0.97x (autogram UPGrad) of these estimates."""
  t, f = cfg.num_tasks, 4
  table = cfg.vocab * cfg.embed_dim
  out = {"torch plain": 0}
  for name in methods:
    if torchjd_pair(name) is None:
      continue
    out[f"autojac {name}"] = t * p_total * f + 2 * t * table * f
    out[f"autogram {name}"] = 4 * t * table * f
  return out


def torch_steps(cfg, params, batch, names):
  """name -> zero-argument step for the PyTorch variants named in ``names``.
  One model and one Adam optimizer serve every variant (the values drift from
  step to step; the work per step does not), and ``autogram`` runs on a twin
  module tree holding the same parameters, so that the Engine's hooks stay
  off the other variants' forward passes."""
  import recsys_models_torch as rt  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from torchjd.aggregation import GramianWeightedAggregator  # pylint: disable=import-outside-toplevel
  from torchjd.autogram import Engine  # pylint: disable=import-outside-toplevel
  from torchjd.autojac import backward, jac_to_grad  # pylint: disable=import-outside-toplevel

  model = rt.torch_model(cfg, params)
  hooked = rt.twin(model)
  engine = Engine(hooked, batch_dim=None)
  plist = list(model.parameters())
  opt = torch.optim.Adam(plist, lr=1e-3)
  tb = rt.to_torch(batch)

  def make(kind, name=None):
    agg, weighting = torchjd_pair(name) if name else (None, None)
    gramian_route = isinstance(agg, GramianWeightedAggregator)

    def step():
      opt.zero_grad(set_to_none=True)
      if kind == "plain":
        model(tb).sum().backward()
      elif kind == "autojac":
        backward(model(tb))
        jac_to_grad(plist, agg, optimize_gramian_computation=gramian_route)
      else:
        losses = hooked(tb)
        losses.backward(weighting(engine.compute_gramian(losses)))
      opt.step()

    return step

  out = {}
  for key in names:
    kind, _, name = key.partition(" ")
    out[key] = make("plain") if kind == "torch" else make(kind, name)
  if "torch plain" in out:
    out["torch plain"]()  # allocates Adam's state outside the timed calls
  return out


# ---------------------------------------------------------------- timing


REFERENCES = ("plain", "torch plain")


def interleaved(calls, rounds, slow_s):
  """(name -> seconds per call, names timed by one call, name -> error).

  One warm-up round (one call of each); a call slower than ``slow_s`` is the
  measurement of its variant, which then sits out the ``rounds`` interleaved
  rounds (one call of each per round, every other round in reverse order)
  whose median times the others. The plain steps (the references of the
  ratios) always take the rounds: a first call also pays for first touches
  of fresh memory. A variant that raises is reported, not timed."""
  times = {k: [] for k in calls}
  single, errors = set(), {}
  for k, fn in list(calls.items()):
    t0 = time.perf_counter()
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      errors[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      del calls[k], times[k]
      continue
    dt = time.perf_counter() - t0
    if dt > slow_s and k not in REFERENCES:
      times[k].append(dt)
      single.add(k)
  order = [k for k in calls if k not in single]
  for r in range(rounds):
    # every other round in reverse order: no variant always follows the same one
    for k in order if r % 2 == 0 else order[::-1]:
      fn = calls[k]
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}, single, errors


# ---------------------------------------------------------------- one cell


def run_cell(model, vocab, t, args):
  cfg = model_config(model, vocab, t, args.quick)
  graphdef, params = rm.init(cfg, seed=0)
  loss_fn = rm.make_loss_fn(graphdef)
  batch = rm.make_batch_fn(cfg)(0, args.batch)
  p_total = rm.num_params(params)
  routes = collections.Counter(gj.gram_coverage(loss_fn)(params, batch).values())
  budget = args.mem_budget_gib * GIB
  resident = 3 * p_total * 4 + (0 if args.no_torch else 4 * p_total * 4)

  variants, adam_state = jax_variants(loss_fn, params, args.methods)
  calls, temp, reason, steps = {}, {}, {}, {}
  for name, (fn, extra) in variants.items():
    if name.startswith("stacked") and resident + t * p_total * 4 > budget:
      # the T x P stacked gradients alone exceed the budget: not even compiled
      est = (resident + t * p_total * 4) / GIB
      reason[name] = f"out of memory (estimated > {est:.3g} GiB)"
    else:
      steps[name] = (fn, (params, adam_state, extra, batch))
  for name, (exe, temp[name], transient) in compile_steps(steps).items():
    if resident + transient > budget:
      reason[name] = f"out of memory (estimated {(resident + transient) / GIB:.3g} GiB)"
      continue
    extra = steps[name][1][2]

    def call(exe=exe, extra=extra):
      jax.block_until_ready(exe(params, adam_state, extra, batch))

    calls[name] = call
  if not args.no_torch:
    estimates = torch_estimates(cfg, p_total, args.methods)
    runnable = []
    for name, extra_bytes in estimates.items():
      if resident + extra_bytes > budget:
        reason[name] = f"out of memory (estimated {(resident + extra_bytes) / GIB:.3g} GiB)"
      else:
        runnable.append(name)
    calls.update(torch_steps(cfg, params, batch, runnable))
  times, single, errors = interleaved(calls, args.rounds, args.slow_s)
  reason.update({k: f"failed: {v}" for k, v in errors.items()})
  del calls, variants
  gc.collect()
  return dict(
    model=model,
    vocab=vocab,
    t=t,
    params=p_total,
    times=times,
    single=single,
    temp=temp,
    reason=reason,
    routes=routes,
  )


# ---------------------------------------------------------------- report


def _ms(cell, key):
  v = cell["times"].get(key)
  if v is None:
    return None
  return f"{1e3 * v:.1f}{'*' if key in cell['single'] else ''}"


def _ratio(cell, key, ref):
  if key in cell["reason"]:
    return cell["reason"][key]
  if key not in cell["times"]:
    return "n/a"
  if ref not in cell["times"]:
    return f"{_ms(cell, key)} ms (no {ref} step)"
  star = "*" if key in cell["single"] else ""
  return f"{cell['times'][key] / cell['times'][ref]:.1f}x{star}"


def _mib(cell, key):
  v = cell["temp"].get(key)
  if v is None:
    return "-"
  return f"{v / MIB:.1f}" if v < 10 * MIB else f"{v / MIB:.0f}"


def rows(cell, methods, torch):
  out = []
  for name in methods:
    lean, stacked = f"lean {name}", f"stacked {name}"
    torchjd = [
      cell["times"][k] for k in (f"autojac {name}", f"autogram {name}") if k in cell["times"]
    ]
    vs = f"{cell['times'][lean] / min(torchjd):.2f}" if torchjd and lean in cell["times"] else "n/a"
    row = [
      cell["model"],
      f"{cell['vocab']:,}",
      str(cell["t"]),
      name,
      _ms(cell, "plain") or cell["reason"].get("plain", "n/a"),
      _ratio(cell, stacked, "plain"),
      _ratio(cell, lean, "plain"),
      _ms(cell, lean) or "n/a",
      f"{_mib(cell, 'plain')} / {_mib(cell, stacked)} / {_mib(cell, lean)}",
    ]
    if torch:
      no_torchjd = "n/a (not in torchjd)" if torchjd_pair(name) is None else None
      row += [
        _ms(cell, "torch plain") or cell["reason"].get("torch plain", "n/a"),
        no_torchjd or _ratio(cell, f"autojac {name}", "torch plain"),
        no_torchjd or _ratio(cell, f"autogram {name}", "torch plain"),
        vs,
      ]
    out.append("| " + " | ".join(row) + " |")
  return out


def table(cells, methods, torch):
  head = [
    "model",
    "V",
    "T",
    "method",
    "plain (ms)",
    "stacked",
    "lean",
    "lean (ms)",
    "temp MiB plain / stacked / lean",
  ]
  align = ["---", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"]
  if torch:
    head += ["torch plain (ms)", "torchjd autojac", "torchjd autogram", "lean / best torchjd"]
    align += ["---:"] * 4
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
  for cell in cells:
    lines += rows(cell, methods, torch)
  return "\n".join(lines)


def routes_table(cells):
  """How the lean step forms each leaf's Gram block (``gram_coverage``), per
  model and T (the routes do not depend on the table size)."""
  lines = ["| model | T | leaves per route (`gram_coverage`) |", "|---|---:|---|"]
  seen = set()
  for cell in cells:
    if (cell["model"], cell["t"]) in seen:
      continue
    seen.add((cell["model"], cell["t"]))
    text = "; ".join(f"{reason}: {n}" for reason, n in sorted(cell["routes"].items()))
    lines.append(f"| {cell['model']} | {cell['t']} | {text} |")
  return "\n".join(lines)


def describe(cfg_args):
  sizes = ", ".join(
    f"`{m}` {', '.join(f'{k}={v}' for k, v in FULL[m].items())}" for m in cfg_args.models
  )
  d = rm.RecsysConfig()
  return (
    f"Models (`benchmarks/recsys_models.py`): user and item id tables of V x {d.embed_dim}, "
    f"a history of {d.history_len} item ids read from the item table (padding masked, mean "
    f"pooling), side tables of {' and '.join(str(v) for v in d.side_vocab)} rows x "
    f"{d.side_dim}, {d.num_dense} dense features, one tower per task, stacked towers and "
    f"experts (`einsum`); {sizes}; batch {cfg_args.batch}, Zipf-like ids (many duplicates)."
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--vocab", type=int, nargs="+", default=None, help="rows per id table")
  parser.add_argument("--tasks", type=int, nargs="+", default=None)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--slow-s", type=float, default=1.0, help="time slower variants by one call")
  parser.add_argument("--mem-budget-gib", type=float, default=16.0)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=None, help="write a Markdown page here")
  args = parser.parse_args(argv)
  if args.vocab is None:
    args.vocab = [1_000] if args.quick else [50_000, 500_000, 2_000_000]
  if args.tasks is None:
    args.tasks = [2] if args.quick else [2, 8, 16]
  if args.batch is None:
    args.batch = 64 if args.quick else 1024
  if args.quick:
    args.rounds = min(args.rounds, 2)
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(2)

  start = time.perf_counter()
  cells = []
  for model in args.models:
    for vocab in args.vocab:
      for t in args.tasks:
        t0 = time.perf_counter()
        cell = run_cell(model, vocab, t, args)
        cells.append(cell)
        for line in rows(cell, args.methods, not args.no_torch):
          print(line, flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
  minutes = (time.perf_counter() - start) / 60
  text = table(cells, args.methods, not args.no_torch)
  print()
  print(text)
  print()
  print(routes_table(cells))
  print(f"\ntotal {minutes:.1f} min")
  if args.out:
    cmd = "python " + " ".join(
      [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])
    )
    doc = [
      "# Ranking models: plain, stacked and lean steps, next to torchjd",
      "",
      f"Command: `{cmd}`  ",
      f"Date: {datetime.date.today().isoformat()}  ",
      f"Commit: {run_meta.commit()}  ",
      f"Machine: {run_meta.bench_machine(not args.no_torch)}  ",
      f"Run time: {minutes:.1f} min",
      "",
      describe(args),
      "",
      "One jitted float32 training step (gradients, method, Adam, apply) per path: "
      "`plain` is `jax.grad` of the summed losses, `stacked` is "
      "`per_task_value_and_grad` + the method's update, `lean` is "
      "`combined_value_and_grad`. `stacked` and `lean` are ratios of the median step "
      "time to the `plain` step of the same cell, all variants of a cell timed "
      "interleaved (compilation excluded); `*`: a step slower than "
      f"{args.slow_s:g} s, timed by one call. Temporary memory: "
      "`jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes` (XLA:CPU). "
      "torchjd columns: the same model and initial weights in PyTorch, ratio to the "
      "PyTorch plain step; `autojac` is `backward` + `jac_to_grad` "
      "(`optimize_gramian_computation=True` for UPGrad and MGDA), `autogram` is "
      "`Engine(model, batch_dim=None)` + weighting + weighted backward. `lean / best "
      "torchjd`: the lean step's time over the faster of the two torchjd steps (below 1: "
      "the lean step is faster). `out of memory (estimated X GiB)`: not run, its "
      f"estimated peak exceeds {args.mem_budget_gib:g} GiB. The machine may be shared "
      "with other jobs; compare ratios within one cell.",
      "",
      text,
      "",
      "Routes of the lean step's Gram matrix, leaves per route or per reason for the "
      "per-task pullback:",
      "",
      routes_table(cells),
      "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
