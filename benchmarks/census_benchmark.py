"""Census-Income multi-task benchmark: every method of the library, three backbones.

Reproduces the layout of the comparison tables of Bai et al., "GradCraft:
Elevating Multi-task Recommendations through Holistic Gradient Crafting",
KDD 2024 (arXiv:2407.19682) on the public Census-Income (KDD) data set with
three binary tasks (income, never_married, education; see
:func:`gradcraft_jax.datasets.load_census_income`), on three backbones of
``mtl_models`` at their full (default) size: shared bottom, MMoE and PLE,
one table per backbone.

Entries (same initial parameters per seed, data order, optimizer and early
stopping for all; see ``census_bench/training.py``):

* **single-task** models (the reference of RI-A);
* **every method of the library** (enumerated from
  ``gradcraft_jax.methods.__all__``), ``optax.chain(method,
  optax.adam(lr))`` on the stacked per-task gradients of the whole model;
* the methods whose weights read the Gram matrix ("crafting" methods, GradCraft
  included) **also on the shared parameters only** (``gradcraft_jax.shared_only``:
  the task towers get their own task's gradient), rows ``<method> (shared)``;
* **NMT** with priority income > never_married > education (three stages).

GradCraft's ``tau`` and ``eps`` are chosen on the validation split (seed 0)
from the union of the library's grid (``tau in {0.3, 0.6, 1.0}``, ``eps in
{0, 0.05, 0.1}``) and the official implementation's values (``eps in
{1e-10, 1e-9, 1e-8}``, ``tau`` down to 0.1), separately for the whole-model
and the shared-only variant; the selected run's seed 0 is reused, seeds 1..
are new runs, and PCGrad+ (GradCraft's ablation) uses the selected values.
Every other method uses its library defaults. The test split is read once per
run, at the checkpoint selected on validation.

The default run: every method on the shared bottom (the crafting methods of
``CRAFTING`` also shared-only; GradCraft grid of 21 + 8 cells) and the
single-task models; on MMoE and PLE equal weighting and GradCraft (whole
model and shared-only, a 2-cell grid), with the shared bottom's single-task
models (the shared-bottom model trained on each task alone: a plain MLP per
task) as the RI-A reference instead of MMoE and PLE trained on one task; 3
seeds. ``--all-methods`` runs everything on
every backbone, single-task models included (much slower). Outputs in ``--out``: ``table.md``, ``table.csv``,
``results.json``, ``auc_by_method.png``, ``curves.png``,
``grad_cosines.png`` (curves and cosines for the first backbone).

Run from the repository root::

    python benchmarks/census_benchmark.py --out out/census           # default
    python benchmarks/census_benchmark.py --quick --out /tmp/census  # smoke run, shared bottom
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtl_models  # noqa: E402
from census_bench import methods as M  # noqa: E402
from census_bench import plots, report  # noqa: E402
from census_bench.report import SINGLE  # noqa: E402
from census_bench.training import (  # noqa: E402
  Config,
  Context,
  GradCraftRunner,
  MethodRunner,
  NMTRunner,
  RunResult,
  SingleTaskRunner,
  evaluate_test_split,
)

from gradcraft_jax.datasets import load_census_income  # noqa: E402

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the [examples] extra
  tqdm = None

NMT = M.NMT
BACKBONES = ("shared_bottom", "mmoe", "ple")
# GradCraft grids: the library's values and the official implementation's.
LIBRARY_GRID = [(tau, eps) for tau in (0.3, 0.6, 1.0) for eps in (0.0, 0.05, 0.1)]
OFFICIAL_GRID = [(tau, eps) for tau in (0.1, 0.3, 0.6, 1.0) for eps in (1e-10, 1e-9, 1e-8)]
FULL_GRID = LIBRARY_GRID + OFFICIAL_GRID
# Smaller grid (big backbones, the shared-only variant): both families, fewer cells.
SMALL_GRID = [(tau, eps) for tau in (0.1, 0.3, 0.6, 1.0) for eps in (1e-8, 0.1)]
QUICK_GRID = [(0.1, 1e-8), (0.6, 0.1)]
# Gradient-crafting methods (the GradCraft paper's baselines that change the
# direction of the update, and GradCraft): by default these also run on the
# shared parameters only; with --all-methods every method whose weights read
# the Gram matrix does.
CRAFTING = ("mgda", "pcgrad", "pcgrad_plus", "gradvac", "cagrad", "imtl_g", "gradcraft")
# The subset run on MMoE and PLE by default (every method with --all-methods).
CORE_METHODS = ("mean", "gradcraft")
CORE_SHARED = ("gradcraft",)
# MMoE and PLE: the official implementation's smallest tau with eps = 1e-8, and
# the library's tau = 0.6, eps = 0.1.
BIG_GRID = [(0.1, 1e-8), (0.6, 0.1)]

QUICK = dict(seeds=1, batch_size=256, max_steps=40, eval_every=20, patience=2, max_rows=4000)


@dataclasses.dataclass
class Plan:
  """What runs on one backbone."""

  backbone: str
  methods: tuple  # whole-model rows (library method names)
  shared: tuple  # methods also run on the shared parameters only
  grid: list  # GradCraft (tau, eps) grid, whole model
  shared_grid: list  # GradCraft grid, shared-only variant
  single: bool = True
  nmt: bool = True
  # Reuse the first backbone's single-task models as the RI-A reference.
  single_from_first: bool = False


class Log:
  """Result lines never interleave with the progress bar (``tqdm.write``)."""

  def __init__(self, total):
    # A bar only on a terminal: in a log file its carriage returns would mix
    # with the result lines.
    interactive = tqdm is not None and sys.stderr.isatty()
    self.bar = (
      tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True) if interactive else None
    )

  def write(self, msg):
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def step(self, postfix=None):
    if self.bar is not None:
      self.bar.update(1)

  def status(self, s):
    if self.bar is not None:
      self.bar.set_postfix_str(s)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"error: {type(e).__name__}: {msg[:120]}"


def _run_safe(fn, *args, **kwargs) -> RunResult:
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # reported in the table, never dropped
    traceback.print_exc(limit=3, file=sys.stderr)
    return RunResult(status=_error(e))


def _shared_name(m):
  return m + M.SHARED_SUFFIX


def run_grid(runner, grid, params, log, label):
  """GradCraft grid on seed 0; selection on validation AV-A only."""
  rows, best, chosen, chosen_run = [], -np.inf, None, None
  for tau, eps in grid:
    log.status(f"{label} grid tau={tau:g} eps={eps:g}")
    r = _run_safe(runner.run, 0, params, tau, eps, evaluate_test=False)
    log.step()
    v = float(np.mean(r.val_auc)) if r.status == "ok" else np.nan
    rows.append({"tau": tau, "eps": eps, "val_AV-A": v, "status": r.status, "steps": r.steps})
    if np.isfinite(v) and v > best:
      best, chosen, chosen_run = v, {"tau": tau, "eps": eps}, r
  if chosen_run is not None:
    evaluate_test_split(runner.ctx, chosen_run)  # the selected run's one look at the test split
  return rows, chosen, chosen_run


def run_backbone(plan: Plan, cfg: Config, data, log: Log, single_ref=None) -> dict:
  """Every entry of ``plan`` over the seeds; returns results, rows and grids.
  ``single_ref``: single-task results to reuse as the RI-A reference."""
  cfg = dataclasses.replace(cfg, model=plan.backbone)
  t0 = time.perf_counter()
  ctx = Context(cfg, data)
  log.write(
    f"[{plan.backbone}] {ctx.num_params} parameters, {ctx.num_shared} shared "
    f"(leaves with gradient from >= 2 tasks); pairs {ctx.pairs}"
  )
  seeds = list(range(cfg.seeds))
  params0 = {s: ctx.init_params(s) for s in seeds}
  results: dict[str, Any] = {}
  order = [SINGLE] if plan.single or single_ref is not None else []
  if not plan.single and single_ref is not None:
    results[SINGLE] = single_ref
  runners: dict[str, Any] = {}

  for m in plan.methods:
    order.append(m)
    if m == "gradcraft":
      continue
    try:
      runners[m] = MethodRunner(ctx, m)
    except M.Skip as e:
      results[m] = str(e)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc(limit=3, file=sys.stderr)
      results[m] = _error(e)
  for m in plan.shared:
    name = _shared_name(m)
    order.append(name)
    if m == "gradcraft":
      continue
    if m in runners and not runners[m].reads_gram:
      order.pop()  # loss-only weights: shared-only is the same method, no row
      continue
    try:
      runners[name] = MethodRunner(ctx, m, shared=True)
    except M.Skip as e:
      results[name] = str(e)
    except Exception as e:  # noqa: BLE001
      results[name] = _error(e)
  if plan.nmt:
    order.append(NMT)

  grids, chosen = {}, {}
  for label, shared, grid in (
    ("gradcraft", False, plan.grid),
    (_shared_name("gradcraft"), True, plan.shared_grid),
  ):
    if label not in order:
      continue
    try:
      runners[label] = GradCraftRunner(ctx, shared=shared)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc(limit=3, file=sys.stderr)
      results[label] = _error(e)
      continue
    g_rows, ch, run0 = run_grid(runners[label], grid, params0[0], log, label)
    grids[label] = g_rows
    chosen[label] = ch or {"tau": 0.6, "eps": 0.1}
    runners[label].seed0 = run0
    log.write(f"[{plan.backbone}] {label}: chosen on validation {chosen[label]}")
  for label, shared in (("pcgrad_plus", False), (_shared_name("pcgrad_plus"), True)):
    gc = _shared_name("gradcraft") if shared else "gradcraft"
    if label in order and gc in chosen and not isinstance(results.get(label), str):
      try:  # GradCraft's ablation uses GradCraft's selected tau and eps
        runners[label] = MethodRunner(ctx, "pcgrad_plus", shared=shared, hparams=chosen[gc])
      except Exception as e:  # noqa: BLE001
        results[label] = _error(e)
  if plan.single:
    runners[SINGLE] = SingleTaskRunner(ctx)
  if plan.nmt:
    runners[NMT] = NMTRunner(ctx)

  for m in order:
    if m == SINGLE and not plan.single:
      continue  # reused from the first backbone
    if isinstance(results.get(m), str):
      log.write(f"  [{plan.backbone}] {m:<28} {results[m]}")
      for _ in seeds:
        log.step()
      continue
    results[m] = {}
    for s in seeds:
      log.status(f"{plan.backbone}: {m} seed {s}")
      runner = runners[m]
      if m in chosen:
        if s == 0 and getattr(runner, "seed0", None) is not None:
          r = runner.seed0
        else:
          r = _run_safe(runner.run, s, params0[s], chosen[m]["tau"], chosen[m]["eps"])
      else:
        r = _run_safe(runner.run, s, params0[s])
      results[m][s] = r
      log.step()
      tail = f"test AUC {np.round(r.test_auc, 4).tolist()}" if r.status == "ok" else r.status
      log.write(f"  [{plan.backbone}] {m:<28} seed {s}: {tail} ({r.steps} steps, {r.wall_s:.1f} s)")
  rows = report.summarise(results, order, ctx.task_names)
  return {
    "ctx": ctx,
    "results": results,
    "order": order,
    "rows": rows,
    "grids": grids,
    "chosen": chosen,
    "wall_s": time.perf_counter() - t0,
  }


def make_plans(args, cfg) -> list[Plan]:
  names = M.library_method_names()
  if args.methods:
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in names]
    if unknown:
      raise SystemExit(f"unknown methods {unknown}; available: {names}")
    names = wanted
  plans = []
  for i, b in enumerate(args.backbones):
    full = i == 0 or args.all_methods or args.methods
    methods = tuple(names) if full else tuple(m for m in CORE_METHODS if m in names)
    if args.all_methods:  # loss-only ones are dropped later
      shared = tuple(m for m in methods if m != "mean" and m not in M.SECOND_BATCH)
    elif full:
      shared = tuple(m for m in methods if m in CRAFTING)
    else:
      shared = tuple(m for m in CORE_SHARED if m in methods)
    if args.no_shared or args.quick and i > 0:
      shared = ()
    if args.quick:
      grid = shared_grid = QUICK_GRID
    elif args.no_grid:
      grid = shared_grid = [(0.6, 0.1)]
    else:
      grid = FULL_GRID if full else BIG_GRID
      shared_grid = SMALL_GRID if full else BIG_GRID
    nmt = not args.no_nmt and (full or args.quick)
    # By default the single-task models are trained once, on the first
    # backbone (a plain MLP per task), and reused as the RI-A reference.
    single = not args.no_single and (i == 0 or bool(args.all_methods))
    plans.append(
      Plan(
        b,
        methods,
        shared,
        grid,
        shared_grid,
        single=single,
        nmt=nmt,
        single_from_first=not args.no_single and not single,
      )
    )
  return plans


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="out/census", help="output directory")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: data slice, 1 seed, tiny grid, shared bottom only unless --backbones",
  )
  ap.add_argument(
    "--backbones",
    default=None,
    help="comma-separated; the first runs every method (default: " + ",".join(BACKBONES) + ")",
  )
  for f in ("seeds", "batch_size", "max_steps", "eval_every", "patience", "max_rows"):
    ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
  ap.add_argument("--lr", type=float, default=None)
  ap.add_argument("--methods", default=None, help="comma-separated subset of the library methods")
  ap.add_argument(
    "--all-methods", action="store_true", help="every method on every backbone (slower)"
  )
  ap.add_argument("--no-grid", action="store_true", help="GradCraft at tau=0.6, eps=0.1, no grid")
  ap.add_argument("--no-shared", action="store_true", help="skip the shared-only rows")
  ap.add_argument("--no-single", action="store_true", help="skip the single-task models (no RI-A)")
  ap.add_argument("--no-nmt", action="store_true", help="skip NMT")
  args = ap.parse_args(argv)
  if args.backbones is None:
    args.backbones = "shared_bottom" if args.quick else ",".join(BACKBONES)
  args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
  bad = [b for b in args.backbones if b not in mtl_models.MODELS]
  if bad:
    ap.error(f"unknown backbones {bad}; choose from {sorted(mtl_models.MODELS)}")
  cfg = Config()
  if args.quick:
    for k, v in QUICK.items():
      setattr(cfg, k, v)
  for k in ("seeds", "batch_size", "max_steps", "eval_every", "patience", "max_rows", "lr"):
    v = getattr(args, k)
    if v is not None:
      setattr(cfg, k, v)
  return args, cfg


def _header(plan, out, cfg, first_backbone):
  ctx = out["ctx"]
  gc = "; ".join(f"{k}: tau={v['tau']:g}, eps={v['eps']:g}" for k, v in out["chosen"].items())
  reused = (
    f"The `single_task` row (the RI-A reference) is the `{first_backbone}` table's: "
    f"the `{first_backbone}` model trained on each task's loss alone (a plain MLP per "
    f"task), not a `{plan.backbone}` trained on one task (saves about 5 minutes). "
    if plan.single_from_first
    else ""
  )
  return (
    f"Backbone `{plan.backbone}` ({ctx.num_params:,} parameters, {ctx.num_shared:,} shared), "
    f"{cfg.seeds} seed(s); test AUC at the checkpoint selected on validation "
    f"(mean ± std over seeds). AV-A: mean AUC over tasks; RI-A: mean relative "
    f"improvement over the single-task models, in %; ΔAV-A vs EW: paired difference "
    f"with equal weighting over seeds (mean ± std) and the number of seeds where the "
    f"method is better. Bold: best multi-task entry per column. {reused}"
    f"GradCraft chosen on validation (seed 0): {gc or 'not run'}. "
    f"Wall time {out['wall_s']:.0f} s.\n\n"
  )


def main(argv=None):
  args, cfg = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  data = load_census_income(max_rows=cfg.max_rows, seed=0)
  print(
    f"Census-Income: train {data.train.num_examples}, val {data.val.num_examples}, "
    f"test {data.test.num_examples} rows; tasks {tuple(data.task_names)}; "
    f"device {jax.devices()[0].platform}; jax {jax.__version__}",
    flush=True,
  )
  print(f"config: {dataclasses.asdict(cfg)}", flush=True)
  plans = make_plans(args, cfg)
  for p in plans:
    print(
      f"plan {p.backbone}: {len(p.methods)} methods, {len(p.shared)} shared-only, "
      f"GradCraft grid {len(p.grid)} + {len(p.shared_grid)} (shared), "
      f"single={p.single}, nmt={p.nmt}",
      flush=True,
    )
  total = sum(
    len(p.grid) * ("gradcraft" in p.methods)
    + len(p.shared_grid) * ("gradcraft" in p.shared)
    + cfg.seeds * (len(p.methods) + len(p.shared) + p.single + p.nmt)
    for p in plans
  )
  log = Log(total)
  outs = {}
  for p in plans:
    ref = None
    if p.single_from_first:
      ref = outs[plans[0].backbone]["results"].get(SINGLE)
      ref = ref if isinstance(ref, dict) else None
    outs[p.backbone] = run_backbone(p, cfg, data, log, single_ref=ref)
  log.close()
  wall = time.perf_counter() - t_start

  task_names = tuple(data.task_names)
  md_parts, csv_parts = [], []
  for p in plans:
    out = outs[p.backbone]
    md = (
      f"### {p.backbone}\n\n"
      + _header(p, out, cfg, plans[0].backbone)
      + report.table_markdown(out["rows"], task_names)
      + f"\nConflict diagnostics ({p.backbone}; all seeds):\n\n"
      + report.diagnostics_markdown(out["rows"])
    )
    for label, g in out["grids"].items():
      taus = sorted({x["tau"] for x in g})
      epss = sorted({x["eps"] for x in g})
      md += (
        f"\nGradCraft grid, `{label}` ({p.backbone}; seed 0, validation AV-A; bold: chosen):\n\n"
        + report.grid_markdown(g, taus, epss, out["chosen"].get(label))
      )
    md_parts.append(md)
    csv = report.table_csv(out["rows"], task_names, backbone=p.backbone)
    csv_parts.append(csv if not csv_parts else csv.split("\n", 1)[1])
  md_all = "\n".join(md_parts) + f"\nTotal wall time: {wall:.0f} s ({jax.devices()[0].platform}).\n"
  print("\n" + md_all, flush=True)
  print(f"wall time {wall:.1f} s on {jax.devices()[0].platform}", flush=True)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(md_all)
  with open(os.path.join(args.out, "table.csv"), "w") as f:
    f.write("".join(csv_parts))

  first = outs[plans[0].backbone]
  plots.plot_auc(
    {b: o["rows"] for b, o in outs.items()}, os.path.join(args.out, "auc_by_method.png")
  )
  window = max(1, cfg.eval_every // 2)
  plots.plot_curves(first["results"], task_names, os.path.join(args.out, "curves.png"), window)
  plots.plot_cosines(
    first["results"],
    first["rows"],
    first["ctx"].pairs,
    os.path.join(args.out, "grad_cosines.png"),
    window,
  )

  def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v

  summary = {
    "config": dataclasses.asdict(cfg),
    "wall_s": wall,
    "device": str(jax.devices()[0]),
    "backbones": {
      b: {
        "chosen": o["chosen"],
        "grids": o["grids"],
        "wall_s": o["wall_s"],
        "rows": [{k: _clean(v) for k, v in r.items()} for r in o["rows"]],
        "runs": {
          m: (
            v
            if isinstance(v, str)
            else {
              str(s): {
                "status": r.status,
                "test_auc": None if r.test_auc is None else r.test_auc.tolist(),
                "val_auc": None if r.val_auc is None else r.val_auc.tolist(),
                "steps": r.steps,
                "best_step": r.best_step,
                "wall_s": r.wall_s,
                "extra": r.extra,
              }
              for s, r in v.items()
            }
          )
          for m, v in o["results"].items()
        },
      }
      for b, o in outs.items()
    },
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(
      summary,
      f,
      indent=1,
      default=lambda o: (
        o.tolist()
        if isinstance(o, np.ndarray)
        else (None if isinstance(o, float) and math.isnan(o) else str(o))
      ),
    )
  return summary


if __name__ == "__main__":
  main()
