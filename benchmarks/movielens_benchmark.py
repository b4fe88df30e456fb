"""MovieLens-100K as a multi-task ranking benchmark: every method of the
library on shared-bottom, MMoE and PLE, with an equal tuning budget and
paired statistics against equal weighting.

Data: MovieLens-100K (GroupLens; its licence forbids redistribution, so it
is never part of the repository). ``--fetch`` downloads it from GroupLens,
or where that is unreachable from the RecBole wheel on PyPI, into
``--data-dir`` (default ``~/.cache/gradcraft-jax/ml-100k``) and says which
source it used; the loader reads the GroupLens ``u.data``/``u.item``/
``u.user`` files or RecBole's atomic ``.inter``/``.item``/``.user`` files.

Tasks (one tower each): **click**, an observed (rated) item against sampled
unobserved items (``--neg-ratio`` per interaction, drawn once with a fixed
seed); **like**, ``rating >= 4`` given a click; **rating**, the rating given
a click (squared error). Features: user id, item id, the item's genres
(multi-valued, mean-pooled), age bucket, gender, occupation, zip prefix,
release-year bucket.

Split: leave-last-out per user by timestamp: the last interaction is the
test split, the one before it the validation split, the rest training.
Metrics (test): click AUC over the held-out items and their sampled
negatives; HR@10 and NDCG@10 of the held-out item ranked by the click score
among 99 items the user never interacted with (the protocol of He et al.,
WWW 2017); like AUC and rating RMSE on the held-out interactions.

Default run: every entry on the shared bottom; equal weighting and GradCraft
on MMoE and PLE (``--all-methods``: every entry on every backbone; the other
rows of the MMoE and PLE tables say they were not run).

Tuning (equal for every entry, single-task models and NMT included): every
learning rate of ``--lrs`` times the first ``--trials`` settings of the
method's own hyperparameters (``benchmarks/tuning.py``), trained on seed
0 and selected on the validation score (the mean over tasks of the
improvement over a constant predictor); the test split is read once per
final run, at the checkpoint selected on validation. The selected setting
runs on ``--seeds`` seeds (seed 0's run is the selected trial).

Statistics: per entry and metric, the paired difference to equal weighting
over seeds, its 95% t-interval, the seeds won and Holm-adjusted decisions
over the entries of a backbone (``benchmarks/stats.py``).

Outputs in ``--out``: ``movielens_table.md`` and ``movielens_table.csv``
(both record the command, date, commit and machine), ``movielens_results.json``
(every trial and run), ``movielens_dm.png`` and ``movielens_ndcg.png``
(paired effects against equal weighting).

Run from the repository root::

    python benchmarks/movielens_benchmark.py --fetch --out docs/benchmarks
    python benchmarks/movielens_benchmark.py --fetch --quick --out /tmp/movielens
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

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import effects_plot  # noqa: E402
import run_meta  # noqa: E402
import tuning  # noqa: E402
from census_bench import methods as M  # noqa: E402
from movielens_bench import data as D  # noqa: E402
from movielens_bench import report  # noqa: E402
from movielens_bench.model import ModelConfig  # noqa: E402
from movielens_bench.training import (  # noqa: E402
  Config,
  Context,
  MethodRunner,
  NMTRunner,
  RunResult,
  SingleTaskRunner,
  evaluate_test_split,
)

BACKBONES = ("shared_bottom", "mmoe", "ple")
SINGLE, NMT, EW = report.SINGLE, report.NMT, report.EW
DEFAULT_LRS = "1e-3,3e-3"
QUICK = dict(max_users=60, max_epochs=1.0, evals_per_epoch=2, patience=1, batch_size=256)
QUICK_METHODS = "mean,gradcraft"
# Entries trained on the second and third backbones by default (every entry
# with --all-methods); the other rows say why they are empty.
CORE_ENTRIES = (EW, "gradcraft")
NOT_RUN = "not run on this backbone in the default budget (--all-methods runs every entry)"


def _error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"error: {type(e).__name__}: {msg[:160]}"


def _safe(fn, *args, **kwargs) -> RunResult:
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - reported in the table, never dropped
    traceback.print_exc(limit=3, file=sys.stderr)
    return RunResult(status=_error(e))


def _margin(scores) -> float:
  s = sorted((x for x in scores if np.isfinite(x)), reverse=True)
  return s[0] - s[1] if len(s) > 1 else math.nan


def tune_and_run(runner, name, params0, seeds, lrs, trials, log) -> dict:
  """Tuning trials on seed 0 (validation only), then the selected setting on every seed."""
  t0 = time.perf_counter()
  rows, best, best_run = [], None, None
  for lr, hp in tuning.grid(name, lrs, trials):
    r = _safe(runner.run, 0, params0[0], lr, hp, evaluate_test=False)
    rows.append({"lr": lr, "hparams": hp, "score": r.score, "status": r.status, "steps": r.steps})
    log(f"    trial {name} lr={lr:g} {tuning.describe(hp)}: val {r.score:.5f} ({r.status})")
    if r.status == "ok" and (best_run is None or r.score > best_run.score):
      best, best_run = rows[-1], r
  out = {"trials": rows, "chosen": None, "runs": {}, "margin": _margin(r["score"] for r in rows)}
  if best_run is None:
    out["runs"] = {0: RunResult(status=f"every trial failed: {rows[0]['status']}")}
    out["wall_s"] = time.perf_counter() - t0
    return out
  best["chosen"] = True
  out["chosen"] = {"lr": best["lr"], "hparams": best["hparams"]}
  out["runs"][0] = evaluate_test_split(runner.ctx, best_run)
  for s in seeds[1:]:
    out["runs"][s] = _safe(runner.run, s, params0[s], best["lr"], best["hparams"])
  out["wall_s"] = time.perf_counter() - t0
  return out


def tune_and_run_single(runner: SingleTaskRunner, params0, seeds, lrs, log) -> dict:
  """Single-task models: each task's model gets the learning-rate grid,
  selected on its own task's validation score."""
  t0 = time.perf_counter()
  T = runner.ctx.T
  rows, chosen, best_runs = [], [], []
  for t in range(T):
    best, best_run = None, None
    for lr in lrs:
      r = _safe(runner.run_task, 0, params0[0], lr, t, evaluate_test=False)
      rows.append({"lr": lr, "task": t, "score": r.score, "status": r.status, "steps": r.steps})
      log(f"    trial single_task task {t} lr={lr:g}: val {r.score:.5f} ({r.status})")
      if r.status == "ok" and (best_run is None or r.score > best_run.score):
        best, best_run = rows[-1], r
    if best_run is None:
      return {
        "trials": rows,
        "chosen": None,
        "runs": {0: RunResult(status=f"every trial of task {t} failed")},
        "wall_s": time.perf_counter() - t0,
      }
    best["chosen"] = True
    chosen.append(best["lr"])
    best_runs.append(evaluate_test_split(runner.ctx, best_run))
  margins = [_margin(r["score"] for r in rows if r["task"] == t) for t in range(T)]
  out = {
    "trials": rows,
    "chosen": {"lr": chosen, "hparams": {}},
    "margin": float(np.nanmin(margins)) if np.any(np.isfinite(margins)) else math.nan,
    "runs": {0: runner.combine(best_runs)},
  }
  for s in seeds[1:]:
    runs = [_safe(runner.run_task, s, params0[s], chosen[t], t) for t in range(T)]
    out["runs"][s] = runner.combine(runs)
  out["wall_s"] = time.perf_counter() - t0
  return out


def run_backbone(backbone, entries, ml, sp, rows, cfg, mc, args, log, run=None) -> dict:
  """Every entry of ``entries`` on ``backbone`` (only those in ``run`` are
  trained; the others get a row that says so)."""
  t0 = time.perf_counter()
  ctx = Context(ml, sp, rows, cfg, backbone, mc)
  log(f"[{backbone}] {ctx.num_params:,} parameters")
  seeds = list(range(args.seeds))
  params0 = {s: ctx.init_params(s) for s in seeds}
  results = {}
  for name in entries:
    if run is not None and name not in run:
      results[name] = NOT_RUN
      continue
    log(f"  [{backbone}] {name}")
    try:
      if name == SINGLE:
        runner = SingleTaskRunner(ctx)
      else:
        tuned = tuning.tuned_names(name, args.trials)
        runner = NMTRunner(ctx) if name == NMT else MethodRunner(ctx, name, tuned)
    except M.Skip as e:
      results[name] = str(e)
      log(f"  [{backbone}] {name}: {e}")
      continue
    except Exception as e:  # noqa: BLE001
      traceback.print_exc(limit=3, file=sys.stderr)
      results[name] = _error(e)
      continue
    if name == SINGLE:
      results[name] = tune_and_run_single(runner, params0, seeds, args.lrs, log)
    else:
      results[name] = tune_and_run(runner, name, params0, seeds, args.lrs, args.trials, log)
    for s, r in results[name]["runs"].items():
      tail = (
        " ".join(f"{k} {r.test[k]:.4f}" for k in report.TEST_METRICS)
        if r.status == "ok" and r.test
        else r.status
      )
      log(f"  [{backbone}] {name:<24} seed {s}: {tail} ({r.steps} steps, {r.wall_s:.1f} s)")
  rows_out = report.summarise(results, entries, alpha=args.alpha)
  return {"ctx": ctx, "results": results, "rows": rows_out, "wall_s": time.perf_counter() - t0}


def entries_of(args) -> list[str]:
  names = M.library_method_names()
  extra = [SINGLE, NMT]
  if args.methods:
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in names and m not in extra]
    if unknown:
      raise SystemExit(f"unknown methods {unknown}; available: {names + extra}")
    if EW not in wanted:
      wanted.insert(0, EW)  # the reference of every comparison
  else:
    wanted = names + ([] if args.no_single else [SINGLE]) + ([] if args.no_nmt else [NMT])
  # The reference first, the single-task models next, the rest in library order.
  order = [EW] + [SINGLE] * (SINGLE in wanted)
  order += [m for m in names + [NMT] if m in wanted and m not in order]
  return order


# Config fields that are also integer command-line options (--batch-size, ...).
INT_OPTIONS = (
  "batch_size",
  "neg_ratio",
  "patience",
  "evals_per_epoch",
  "max_users",
  "holdout",
  "eval_negatives",
)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="out/movielens", help="output directory")
  ap.add_argument("--data-dir", default=None, help=f"data directory (default {D.DEFAULT_CACHE})")
  ap.add_argument("--fetch", action="store_true", help="download the data if it is not there")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 60 users, equal weighting and GradCraft, 1 seed, 1 learning rate, "
    "1 trial, 1 epoch, shared bottom",
  )
  ap.add_argument("--backbones", default=None, help="comma-separated (default: all three)")
  ap.add_argument(
    "--methods",
    default=None,
    help="comma-separated library methods (and single_task, nmt); equal weighting is always run",
  )
  ap.add_argument(
    "--all-methods",
    action="store_true",
    help="every entry on every backbone (default: every entry on the first backbone, "
    "equal weighting and GradCraft on the others)",
  )
  ap.add_argument("--no-single", action="store_true", help="skip the single-task models")
  ap.add_argument("--no-nmt", action="store_true", help="skip NMT")
  ap.add_argument("--seeds", type=int, default=None, help="seeds per entry (default 5)")
  ap.add_argument("--lrs", default=None, help=f"learning-rate grid (default {DEFAULT_LRS})")
  ap.add_argument(
    "--trials", type=int, default=None, help="settings of each method's hyperparameters (2)"
  )
  for f in INT_OPTIONS:
    ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
  ap.add_argument("--max-epochs", type=float, default=None)
  ap.add_argument("--alpha", type=float, default=0.05, help="family-wise level of Holm's procedure")
  args = ap.parse_args(argv)
  if args.backbones is None:
    args.backbones = "shared_bottom" if args.quick else ",".join(BACKBONES)
  args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
  bad = [b for b in args.backbones if b not in BACKBONES]
  if bad:
    ap.error(f"unknown backbones {bad}; choose from {list(BACKBONES)}")
  if args.quick and args.methods is None:
    args.methods = QUICK_METHODS
  if args.seeds is None:
    args.seeds = 1 if args.quick else 5
  if args.lrs is None:
    args.lrs = DEFAULT_LRS.split(",")[0] if args.quick else DEFAULT_LRS
  args.lrs = [float(x) for x in str(args.lrs).split(",") if x.strip()]
  if args.trials is None:
    args.trials = 1 if args.quick else 2
  if args.seeds < 1 or args.trials < 1 or not args.lrs:
    ap.error("--seeds and --trials must be >= 1 and --lrs non-empty")
  cfg = Config()
  if args.quick:
    for k, v in QUICK.items():
      setattr(cfg, k, v)
  for k in (*INT_OPTIONS, "max_epochs"):
    v = getattr(args, k)
    if v is not None:
      setattr(cfg, k, v)
  return args, cfg


def _json_default(o):
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  return str(o)


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _clean(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  return v


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args, cfg = parse_args(argv)
  meta = run_meta.metadata("benchmarks/movielens_benchmark.py", argv)
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()

  def log(msg):
    print(msg, flush=True)

  data_dir = args.data_dir or D.DEFAULT_CACHE
  if args.fetch:
    D.fetch(data_dir, log=log)
  raw = D.read(data_dir)
  meta["data"] = f"MovieLens-100K ({raw.source} layout) from {D.source_note(data_dir)}"
  ml = D.subset(D.encode(raw), cfg.max_users)
  sp = D.split(ml, cfg.holdout)
  rows = D.training_rows(ml, sp, cfg.neg_ratio, cfg.data_seed)
  log(
    f"{meta['data']}: {ml.n_users} users, {ml.n_items} items, {ml.user.size} interactions; "
    f"train {sp.train['user'].size} (+{cfg.neg_ratio} sampled negatives each), "
    f"val {sp.val['user'].size}, test {sp.test['user'].size}"
  )
  log(f"machine: {meta['machine']}")
  log(f"config: {dataclasses.asdict(cfg)}")
  entries = entries_of(args)
  plan = {}
  for i, b in enumerate(args.backbones):
    every = i == 0 or args.all_methods or args.methods is not None
    plan[b] = entries if every else [e for e in entries if e in CORE_ENTRIES]
    n_trials = sum(len(tuning.grid(e, args.lrs, args.trials)) for e in plan[b])
    log(
      f"plan {b}: {len(plan[b])} entries; learning rates {args.lrs}; up to {args.trials} "
      f"hyperparameter settings each: {n_trials} tuning trials and "
      f"{len(plan[b]) * (args.seeds - 1)} further seed runs"
    )
  mc = ModelConfig()
  outs = {}
  for b in args.backbones:
    outs[b] = run_backbone(b, entries, ml, sp, rows, cfg, mc, args, log, run=plan[b])
    log(f"[{b}] done in {outs[b]['wall_s']:.0f} s")
  wall = time.perf_counter() - t_start
  meta["wall time"] = f"{wall:.0f} s"

  rows_by = {b: o["rows"] for b, o in outs.items()}
  budget = (
    f"Tuning budget, equal for every entry: learning rates {', '.join(f'{x:g}' for x in args.lrs)} "
    f"x up to {args.trials} settings of the method's own hyperparameters (the `trials` column), "
    "trained on seed 0 and selected on the validation score (mean over tasks of the improvement "
    "over a constant predictor); the single-task models select a learning rate per task. "
    f"The test split is read once per final run; {args.seeds} seed(s) per entry."
  )
  stats_note = (
    "Paired differences to equal weighting (EW) of the same seed: mean [interval at Holm's "
    "level] (seeds won / paired seeds) decision. Decisions are Holm-adjusted over the "
    "entries compared on a backbone at family-wise level "
    f"{args.alpha:g}; 'better' or 'worse' only where that interval excludes zero. The "
    "per-comparison 95% t-intervals are in the CSV. Δm: mean over the three tasks of the "
    "relative difference (AUC up, RMSE down), in %."
  )
  caption = " · ".join(
    f"{k}: {meta[k]}" for k in ("data", "machine", "date", "commit", "command") if k in meta
  )
  md = [
    "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n",
    f"\nConfig: `{json.dumps(dataclasses.asdict(cfg))}`; model sizes `{dataclasses.asdict(mc)}`.\n",
    f"\n{budget}\n",
  ]
  for b, o in outs.items():
    ctx = o["ctx"]
    md += [
      f"\n### {b} ({ctx.num_params:,} parameters; {o['wall_s']:.0f} s)\n\n",
      "Test metrics (mean ± std over seeds); HR@10 and NDCG@10 rank the held-out item "
      f"among {cfg.eval_negatives} sampled negatives; Δm vs STL: against the single-task "
      "models of the same seed.\n\n",
      report.table_markdown(o["rows"]),
      f"\n{stats_note}\n\n",
      report.paired_markdown(o["rows"]),
      f"\nConflict diagnostics ({b}; training batches, all seeds): pairwise cosines of "
      "the task gradients.\n\n",
      report.diagnostics_markdown(o["rows"]),
      f"\nTuning trials ({b}; seed 0, validation score; bold: chosen):\n\n",
      report.trials_markdown(o["results"], list(o["results"])),
    ]
  md_text = "".join(md)
  with open(os.path.join(args.out, "movielens_table.md"), "w") as f:
    f.write(md_text)
  with open(os.path.join(args.out, "movielens_table.csv"), "w") as f:
    f.write(report.table_csv(rows_by, meta))
  figures = {}
  for metric, fname in (("dm", "movielens_dm.png"), ("ndcg", "movielens_ndcg.png")):
    path = os.path.join(args.out, fname)
    if effects_plot.plot_effects(
      rows_by,
      f"d_{metric}_",
      path,
      label="Δm (%)" if metric == "dm" else report.METRIC_LABELS[metric],
      title="MovieLens-100K, test",
      caption=caption,
      digits=report.DIGITS[metric],
      lower_is_better=not report.HIGHER_IS_BETTER[metric],
    ):
      figures[metric] = fname
  summary = {
    "meta": meta,
    "config": dataclasses.asdict(cfg),
    "model": dataclasses.asdict(mc),
    "lrs": args.lrs,
    "trials": args.trials,
    "seeds": args.seeds,
    "figures": figures,
    "backbones": {
      b: {
        "wall_s": o["wall_s"],
        "num_params": o["ctx"].num_params,
        "rows": [_clean(r) for r in o["rows"]],
        "entries": {
          name: (
            e
            if isinstance(e, str)
            else {
              "trials": _clean(e["trials"]),
              "chosen": e["chosen"],
              "runs": {
                str(s): {
                  "status": r.status,
                  "val": _clean(r.val),
                  "test": _clean(r.test),
                  "score": _clean(r.score),
                  "steps": r.steps,
                  "best_step": r.best_step,
                  "wall_s": r.wall_s,
                  "extra": _clean({k: v for k, v in r.extra.items() if k != "losses"}),
                }
                for s, r in e["runs"].items()
              },
            }
          )
          for name, e in o["results"].items()
        },
      }
      for b, o in outs.items()
    },
  }
  with open(os.path.join(args.out, "movielens_results.json"), "w") as f:
    json.dump(summary, f, indent=1, default=_json_default)
  print("\n" + md_text, flush=True)
  print(f"wall time {wall:.1f} s on {jax.devices()[0].platform}", flush=True)
  return summary


if __name__ == "__main__":
  main()
