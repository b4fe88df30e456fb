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

Equal tuning budget (``benchmarks/tuning.py``): every entry, equal
weighting, the single-task models and NMT included, is trained at every
learning rate of ``--lrs`` (default 0.003 and 0.01) and, for a method with
hyperparameters of its own, at each of its first ``--trials`` settings
(default 2; GradCraft's ``tau``/``eps`` included, no larger grid for any
method); the trials run on seed 0 and the best validation AV-A is selected
(the single-task models select a learning rate per task on their own task's
AUC). The selected run's seed 0 is reused, seeds 1.. are new runs. The test
split is read once per final run, at the checkpoint selected on validation,
never during tuning.

Statistics (``benchmarks/stats.py``): for every entry, the paired difference
of AV-A to equal weighting over seeds, its 95% t-interval, the seeds won,
and a decision ("better"/"worse" only where the interval at Holm's level
excludes zero; Holm over the entries of a backbone).

The default run: every method on the shared bottom, GradCraft also
shared-only (``--shared-crafting``: every method of ``CRAFTING`` also
shared-only), and the single-task models; on MMoE and PLE equal weighting
and GradCraft (whole model and shared-only), with the shared
bottom's single-task models (the shared-bottom model trained on each task
alone: a plain MLP per task) as the RI-A reference instead of MMoE and PLE
trained on one task; 3 seeds. ``--all-methods`` runs everything on every
backbone, single-task models included (much slower). Outputs in ``--out``:
``table.md``, ``table.csv``, ``results.json``, ``auc_by_method.png``,
``auc_effects.png`` (paired differences to equal weighting), ``curves.png``,
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
import effects_plot  # noqa: E402
import mtl_models  # noqa: E402
import run_meta  # noqa: E402
import tuning  # noqa: E402
from census_bench import methods as M  # noqa: E402
from census_bench import plots, report  # noqa: E402
from census_bench.report import SINGLE  # noqa: E402
from census_bench.training import (  # noqa: E402
  Config,
  Context,
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
# Gradient-crafting methods (the GradCraft paper's baselines that change the
# direction of the update, and GradCraft): with --shared-crafting these also
# run on the shared parameters only (by default GradCraft only); with
# --all-methods every method whose weights read the Gram matrix does.
CRAFTING = ("mgda", "pcgrad", "pcgrad_plus", "gradvac", "cagrad", "imtl_g", "gradcraft")
# The subset run on MMoE and PLE by default (every method with --all-methods).
CORE_METHODS = ("mean", "gradcraft")
CORE_SHARED = ("gradcraft",)

QUICK = dict(
  seeds=1, batch_size=256, max_steps=40, eval_every=20, patience=2, max_rows=4000, trials=1
)


@dataclasses.dataclass
class Plan:
  """What runs on one backbone."""

  backbone: str
  methods: tuple  # whole-model rows (library method names)
  shared: tuple  # methods also run on the shared parameters only
  single: bool = True
  nmt: bool = True
  # Reuse the first backbone's single-task models as the RI-A reference.
  single_from_first: bool = False
  # Library methods (and NMT) this run leaves out on this backbone.
  not_run: tuple = ()


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


def _margin(values) -> float:
  v = sorted((x for x in values if np.isfinite(x)), reverse=True)
  return v[0] - v[1] if len(v) > 1 else math.nan


def tune_and_run(runner, name, params0, seeds, cfg, log, label) -> tuple[dict, dict]:
  """Tuning trials on seed 0 (validation AV-A only), then the selected
  setting on every seed. Returns ``(runs by seed, tuning record)``."""
  trials, best = [], None
  for lr, hp in tuning.grid(name, cfg.lrs, cfg.trials):
    log.status(f"{label} trial lr={lr:g} {tuning.describe(hp)}")
    r = _run_safe(runner.run, 0, params0[0], lr, hp, evaluate_test=False)
    log.step()
    v = float(np.mean(r.val_auc)) if r.status == "ok" else math.nan
    trials.append({"lr": lr, "hparams": hp, "val_AV-A": v, "status": r.status, "steps": r.steps})
    if np.isfinite(v) and (best is None or v > best[0]):
      best = (v, len(trials) - 1, r)
  record = {"trials": trials, "chosen": None, "margin": _margin(t["val_AV-A"] for t in trials)}
  if best is None:
    for _ in seeds[1:]:
      log.step()
    return {0: RunResult(status=f"every trial failed ({trials[0]['status']})")}, record
  _, idx, run0 = best
  trials[idx]["chosen"] = True
  chosen = {"lr": trials[idx]["lr"], "hparams": trials[idx]["hparams"]}
  record["chosen"] = chosen
  runs = {0: evaluate_test_split(runner.ctx, run0)}  # its one look at the test split
  for s in seeds[1:]:
    log.status(f"{label} seed {s}")
    runs[s] = _run_safe(runner.run, s, params0[s], chosen["lr"], chosen["hparams"])
    log.step()
  return runs, record


def tune_and_run_single(runner, params0, seeds, cfg, log) -> tuple[dict, dict]:
  """Single-task models: each task's model gets the learning-rate grid,
  selected on its own task's validation AUC."""
  T = runner.ctx.T
  trials, chosen, best_runs = [], [], []
  for t in range(T):
    best = None
    for lr in cfg.lrs:
      log.status(f"single_task task {t} trial lr={lr:g}")
      r = _run_safe(runner.run_task, 0, params0[0], lr, t, evaluate_test=False)
      v = float(r.val_auc[t]) if r.status == "ok" else math.nan
      trials.append({"lr": lr, "task": t, "val_AV-A": v, "status": r.status, "steps": r.steps})
      if np.isfinite(v) and (best is None or v > best[0]):
        best = (v, len(trials) - 1, r)
    if best is None:
      failed = RunResult(status=f"every trial of task {runner.ctx.task_names[t]} failed")
      return {0: failed}, {"trials": trials, "chosen": None, "margin": math.nan}
    trials[best[1]]["chosen"] = True
    chosen.append(trials[best[1]]["lr"])
    best_runs.append(evaluate_test_split(runner.ctx, best[2]))
  log.step()
  margins = [_margin(x["val_AV-A"] for x in trials if x["task"] == t) for t in range(T)]
  record = {
    "trials": trials,
    "chosen": {"lr": chosen, "hparams": {}},
    "margin": float(np.nanmin(margins)) if np.any(np.isfinite(margins)) else math.nan,
  }
  runs = {0: runner.combine(best_runs)}
  for s in seeds[1:]:
    log.status(f"single_task seed {s}")
    runs[s] = runner.combine(
      [_run_safe(runner.run_task, s, params0[s], chosen[t], t) for t in range(T)]
    )
    log.step()
  return runs, record


def run_backbone(plan: Plan, cfg: Config, data, log: Log, single_ref=None) -> dict:
  """Every entry of ``plan``: tuning, then the seeds; returns results and rows.
  ``single_ref``: single-task results (and their tuning record) to reuse as the
  RI-A reference."""
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
  records: dict[str, dict] = {}
  order = [SINGLE] if plan.single or single_ref is not None else []
  if not plan.single and single_ref is not None:
    results[SINGLE], records[SINGLE] = single_ref
  runners: dict[str, Any] = {}

  def build(label, factory):
    try:
      runners[label] = factory()
    except M.Skip as e:
      results[label] = str(e)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc(limit=3, file=sys.stderr)
      results[label] = _error(e)

  for m in plan.methods:
    order.append(m)
    build(m, lambda m=m: MethodRunner(ctx, m, tuned=tuning.tuned_names(m, cfg.trials)))
  for m in plan.shared:
    if m in runners and not runners[m].reads_gram:
      continue  # loss-only weights: shared-only is the same method, no row
    name = _shared_name(m)
    order.append(name)
    build(
      name, lambda m=m: MethodRunner(ctx, m, shared=True, tuned=tuning.tuned_names(m, cfg.trials))
    )
  if plan.nmt:
    order.append(NMT)
    build(NMT, lambda: NMTRunner(ctx))
  if plan.single:
    build(SINGLE, lambda: SingleTaskRunner(ctx))

  for m in order:
    if m == SINGLE and not plan.single:
      continue  # reused from the first backbone
    base = m.removesuffix(M.SHARED_SUFFIX)
    if isinstance(results.get(m), str):
      log.write(f"  [{plan.backbone}] {m:<28} {results[m]}")
      for _ in range(plan_runs(base, cfg)):
        log.step()
      continue
    if m == SINGLE:
      runs, rec = tune_and_run_single(runners[m], params0, seeds, cfg, log)
    else:
      runs, rec = tune_and_run(runners[m], base, params0, seeds, cfg, log, m)
    results[m], records[m] = runs, rec
    ch = report.chosen_text(rec)
    log.write(f"  [{plan.backbone}] {m:<28} chosen on validation: {ch}")
    for s, r in runs.items():
      tail = f"test AUC {np.round(r.test_auc, 4).tolist()}" if r.status == "ok" else r.status
      log.write(f"  [{plan.backbone}] {m:<28} seed {s}: {tail} ({r.steps} steps, {r.wall_s:.1f} s)")
  rows = report.summarise(results, order, ctx.task_names, records=records, alpha=cfg.alpha)
  return {
    "ctx": ctx,
    "results": results,
    "records": records,
    "order": order,
    "rows": rows,
    "wall_s": time.perf_counter() - t0,
  }


def plan_runs(name: str, cfg: Config) -> int:
  """Progress steps of one entry: its trials and the further seeds."""
  if name == SINGLE:
    return cfg.seeds
  return len(tuning.grid(name, cfg.lrs, cfg.trials)) + cfg.seeds - 1


def make_plans(args, cfg) -> list[Plan]:
  names = M.library_method_names()
  if args.ablation:
    # GradCraft's parts against the whole method and equal weighting, whole
    # model and shared-only, on every backbone.
    parts = ("gradcraft", *M.ABLATION)
    left = tuple(m for m in names if m not in ("mean", "gradcraft")) + (NMT,)
    return [
      Plan(b, ("mean", *parts), parts, single=False, nmt=False, not_run=left)
      for b in args.backbones
    ]
  if args.methods:
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in names]
    if unknown:
      raise SystemExit(f"unknown methods {unknown}; available: {names}")
    if "mean" not in wanted:
      wanted.insert(0, "mean")  # the reference of every paired comparison
    names = [m for m in names if m in wanted]
  plans = []
  for i, b in enumerate(args.backbones):
    full = i == 0 or args.all_methods or args.methods
    methods = tuple(names) if full else tuple(m for m in CORE_METHODS if m in names)
    if args.all_methods:  # loss-only ones are dropped later
      shared = tuple(m for m in methods if m != "mean" and m not in M.SECOND_BATCH)
    elif full and args.shared_crafting:
      shared = tuple(m for m in methods if m in CRAFTING)
    else:
      shared = tuple(m for m in CORE_SHARED if m in methods)
    if args.no_shared or args.quick and i > 0:
      shared = ()
    nmt = not args.no_nmt and (full or args.quick)
    # By default the single-task models are trained once, on the first
    # backbone (a plain MLP per task), and reused as the RI-A reference.
    single = not args.no_single and (i == 0 or bool(args.all_methods))
    # Every method of the library has a row in every table; the ones this
    # run leaves out on this backbone say so.
    not_run = tuple(m for m in M.library_method_names() if m not in methods)
    not_run += (NMT,) * (not nmt and not args.no_nmt)
    plans.append(
      Plan(
        b,
        methods,
        shared,
        single=single,
        nmt=nmt,
        single_from_first=not args.no_single and not single,
        not_run=not_run,
      )
    )
  return plans


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="out/census", help="output directory")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: data slice, 1 seed, 1 trial per learning rate, shared bottom only "
    "unless --backbones",
  )
  ap.add_argument(
    "--backbones",
    default=None,
    help="comma-separated; the first runs every method (default: " + ",".join(BACKBONES) + ")",
  )
  for f in ("seeds", "batch_size", "max_steps", "eval_every", "patience", "max_rows", "trials"):
    ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
  ap.add_argument(
    "--lrs",
    default=None,
    help="learning-rate grid of every entry, comma-separated (default "
    + ",".join(f"{x:g}" for x in Config.lrs)
    + ")",
  )
  ap.add_argument("--lr", type=float, default=None, help="one learning rate (--lrs LR)")
  ap.add_argument("--alpha", type=float, default=None, help="family-wise level of Holm's procedure")
  ap.add_argument("--methods", default=None, help="comma-separated subset of the library methods")
  ap.add_argument(
    "--all-methods", action="store_true", help="every method on every backbone (slower)"
  )
  ap.add_argument("--no-shared", action="store_true", help="skip the shared-only rows")
  ap.add_argument(
    "--shared-crafting",
    action="store_true",
    help="every crafting method also shared-only on the first backbone (default: GradCraft)",
  )
  ap.add_argument(
    "--ablation",
    action="store_true",
    help="GradCraft's ablation instead: magnitude alignment only, direction deconfliction "
    "only and both, whole model and shared-only, next to equal weighting, on every backbone",
  )
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
  for k in ("seeds", "batch_size", "max_steps", "eval_every", "patience", "max_rows", "trials"):
    v = getattr(args, k)
    if v is not None:
      setattr(cfg, k, v)
  if args.alpha is not None:
    cfg.alpha = args.alpha
  if args.lr is not None:
    cfg.lrs = (args.lr,)
  if args.lrs is not None:
    cfg.lrs = tuple(float(x) for x in args.lrs.split(",") if x.strip())
  if args.quick and args.lrs is None and args.lr is None:
    cfg.lrs = cfg.lrs[:1]
  if cfg.seeds < 1 or cfg.trials < 1 or not cfg.lrs:
    ap.error("--seeds and --trials must be >= 1 and the learning-rate grid non-empty")
  return args, cfg


def budget_text(cfg) -> str:
  """The tuning budget, stated in every table."""
  lrs = ", ".join(f"{x:g}" for x in cfg.lrs)
  return (
    f"Equal tuning budget: every entry (equal weighting, the single-task models and NMT "
    f"included) at each learning rate of {{{lrs}}} and, for a method with hyperparameters "
    f"of its own, at each of its first {cfg.trials} setting(s) (benchmarks/tuning.py; "
    f"GradCraft's tau/eps included, no larger grid for any method), on seed 0; the best "
    f"validation AV-A is selected (the single-task models select a learning rate per task) "
    f"and the test split is read once per final run. The notes give each entry's trials, "
    f"choice and validation margin over the runner-up."
  )


def _header(plan, out, cfg, first_backbone):
  ctx = out["ctx"]
  reused = (
    f"The `single_task` row (the RI-A reference) is the `{first_backbone}` table's: "
    f"the `{first_backbone}` model trained on each task's loss alone (a plain MLP per "
    f"task), not a `{plan.backbone}` trained on one task (saves about 5 minutes). "
    if plan.single_from_first
    else ""
  )
  m = next((r.get("dEW_m") for r in out["rows"] if r.get("dEW_m")), 0)
  return (
    f"Backbone `{plan.backbone}` ({ctx.num_params:,} parameters, {ctx.num_shared:,} shared), "
    f"{cfg.seeds} seed(s); test AUC at the checkpoint selected on validation "
    f"(mean ± sample std over seeds). AV-A: mean AUC over tasks; RI-A: mean relative "
    f"improvement over the single-task models, in %; ΔAV-A vs EW: paired difference "
    f"with equal weighting (EW) of the same seed, mean [interval at Holm's level over "
    f"the {m} entries compared with EW, family-wise level {cfg.alpha:g}] (seeds won / "
    f"paired seeds) and the decision: better or worse only where that interval excludes "
    f"zero (per-comparison 95% t-intervals and p-values in the CSV). Bold: best "
    f"multi-task entry per column. {reused}{budget_text(cfg)} "
    f"Wall time {out['wall_s']:.0f} s.\n\n"
  )


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args, cfg = parse_args(argv)
  meta = run_meta.metadata("benchmarks/census_benchmark.py", argv)
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
  total = 0
  for p in plans:
    entries = list(p.methods) + list(p.shared) + [NMT] * p.nmt + [SINGLE] * p.single
    n = sum(plan_runs(e, cfg) for e in entries)
    total += n
    print(
      f"plan {p.backbone}: {len(p.methods)} methods, {len(p.shared)} shared-only, "
      f"single={p.single}, nmt={p.nmt}; {n} runs (tuning trials and further seeds)",
      flush=True,
    )
  log = Log(total)
  outs = {}
  for p in plans:
    ref = None
    if p.single_from_first:
      first = outs[plans[0].backbone]
      runs = first["results"].get(SINGLE)
      if isinstance(runs, dict):
        ref = (runs, first["records"].get(SINGLE, {}))
    outs[p.backbone] = run_backbone(p, cfg, data, log, single_ref=ref)
  log.close()
  wall = time.perf_counter() - t_start
  meta["wall time"] = f"{wall:.0f} s"

  task_names = tuple(data.task_names)
  md_parts, csv_parts = ["\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"], []
  for p in plans:
    out = outs[p.backbone]
    md = (
      f"### {p.backbone}\n\n"
      + _header(p, out, cfg, plans[0].backbone)
      + report.table_markdown(out["rows"], task_names)
      + report.not_run_markdown(
        p.not_run,
        len(task_names) + 3,
        "not in GradCraft's ablation (`--ablation`); the comparison of every method is "
        "the default run's"
        if args.ablation
        else "not run on this backbone in this run (`--all-methods` runs every method on "
        "every backbone)",
      )
      + f"\nConflict diagnostics ({p.backbone}; all seeds):\n\n"
      + report.diagnostics_markdown(out["rows"])
      + f"\nTuning trials ({p.backbone}; seed 0, validation AV-A, for the single-task "
      "models the task's validation AUC; bold: chosen):\n\n"
      + report.trials_markdown(out["records"], out["order"])
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
    f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()) + "".join(csv_parts))

  first = outs[plans[0].backbone]
  rows_by = {b: o["rows"] for b, o in outs.items()}
  plots.plot_auc(rows_by, os.path.join(args.out, "auc_by_method.png"))
  caption = " · ".join(
    f"{k}: {meta[k]}" for k in ("machine", "date", "commit", "command") if k in meta
  )
  effects_plot.plot_effects(
    rows_by,
    "dEW_",
    os.path.join(args.out, "auc_effects.png"),
    label="AV-A (test)",
    title="Census-Income, test",
    caption=caption,
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
    "meta": meta,
    "config": dataclasses.asdict(cfg),
    "wall_s": wall,
    "device": str(jax.devices()[0]),
    "backbones": {
      b: {
        "tuning": {
          m: {**rec, "margin": _clean(rec.get("margin"))} for m, rec in o["records"].items()
        },
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
