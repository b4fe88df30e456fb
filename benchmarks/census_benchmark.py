"""Census-Income multi-task benchmark: GradCraft vs. the comparison methods.

Reproduces the layout of the comparison tables of Bai et al., "GradCraft:
Elevating Multi-task Recommendations through Holistic Gradient Crafting",
KDD 2024 (arXiv:2407.19682) on the public Census-Income (KDD) data set with
three binary tasks (income, never_married, education; see
:func:`gradcraft_jax.datasets.load_census_income`).

What is trained (same model architecture, data order, optimizer and early
stopping for every entry):

* **Single-task**: for each task ``t``, a model trained on ``l_t`` alone and
  evaluated on task ``t`` only (the other towers receive no gradient, so this
  is exactly a single-tower model with the same bottom); the reference of
  RI-A.
* **Every gradient method of the library**, ``optax.chain(method,
  optax.adam(lr))`` on the stacked per-task gradients: mean,
  uncertainty_weighting, dwa, mgda, pcgrad, pcgrad_plus, gradvac, cagrad,
  imtl, dbmtl, nash_mtl, aligned_mtl, upgrad, gradcraft. A method that is not
  (yet) exported by ``gradcraft_jax`` is listed as "missing".
* **NMT** with priority income > never_married > education, three stages:
  stage 1 trains income alone; stage 2 trains never_married under
  ``l_income <= target_income``; stage 3 trains education under both
  constraints. Each stage early-stops like every other run (on the mean
  validation AUC of the tasks trained so far) and starts from the previous
  stage's selected parameters with a fresh Adam state and fresh multipliers.
  The target of task ``k`` is its **mean training loss over the last
  evaluation period before the selected checkpoint of stage k** (losses on
  the mini-batches, measured before each update).

GradCraft's ``tau`` and ``eps`` are chosen on the validation split from a
grid (``tau in {0.3, 0.6, 1.0} x eps in {0.0, 0.05, 0.1}``) on seed 0, with
the same budget as the final runs; the selected configuration's seed-0 run is
reused, seeds 1.. are new runs. PCGrad+ (GradCraft's ablation) uses the same
selected ``tau`` and ``eps``. Every other method uses its library defaults.

Training: mini-batches of ``--batch-size`` rows drawn epoch by epoch in a
seeded order shared by all methods of a seed; the mean validation AUC over
tasks is evaluated every ``--eval-every`` steps; training stops after
``--patience`` evaluations without improvement or at ``--max-steps``; the
test AUC is measured at the best validation checkpoint. A run whose training
loss or predictions become non-finite is reported as diverged; an exception
is reported as "error: ...". Nothing is dropped silently.

Outputs in ``--out``: ``table.md``, ``table.csv``, ``results.json``,
``auc_by_method.png``, ``curves.png``, ``grad_cosines.png``.

Run from the repository root::

    python benchmarks/census_benchmark.py --out out/census           # default
    python benchmarks/census_benchmark.py --quick --out /tmp/census  # < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtl_models  # noqa: E402

import gradcraft_jax  # noqa: E402
from gradcraft_jax.datasets import load_census_income  # noqa: E402

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the [examples] extra

  def tqdm(iterable=None, **kwargs):
    del kwargs
    return iterable if iterable is not None else _NoBar()


def _write(msg):
  """Prints without breaking the progress bar."""
  if hasattr(tqdm, "write"):
    tqdm.write(msg)
  else:  # pragma: no cover
    print(msg)


class _NoBar:
  def update(self, n=1):
    pass

  def set_postfix_str(self, s):
    pass

  def close(self):
    pass


METHODS = (
  "mean",
  "uncertainty_weighting",
  "dwa",
  "mgda",
  "pcgrad",
  "pcgrad_plus",
  "gradvac",
  "cagrad",
  "imtl",
  "dbmtl",
  "nash_mtl",
  "aligned_mtl",
  "upgrad",
  "gradcraft",
)
# Methods whose ``seed`` argument only seeds the initial state (a PRNG key
# created in ``init``): their update can be traced once and re-used for all
# seeds by initialising the state from the seeded factory.
SEED_IN_STATE_ONLY = ("pcgrad", "pcgrad_plus", "gradvac")
SINGLE = "single_task"
NMT = "nmt"
GRID_TAU = (0.3, 0.6, 1.0)
GRID_EPS = (0.0, 0.05, 0.1)
CURVE_METHODS = ("mean", "gradcraft", "mgda", "pcgrad")
COSINE_METHODS = ("mean", "gradcraft")


@dataclasses.dataclass
class Config:
  model: str = "shared_bottom"
  seeds: int = 3
  batch_size: int = 1024
  lr: float = 3e-3
  max_steps: int = 400
  eval_every: int = 50
  patience: int = 3
  max_rows: int | None = None
  log_every: int = 10
  lagrange_lr: float = 1.0
  lagrange_clip: float = 10.0
  methods: tuple = METHODS
  grid: bool = True


QUICK = dict(
  seeds=1, batch_size=256, max_steps=40, eval_every=20, patience=2, max_rows=4000, log_every=5
)


# --------------------------------------------------------------------------
# Data, model and the shared jitted functions.
# --------------------------------------------------------------------------


class Context:
  """Data on device and the jitted functions shared by every run."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    data = load_census_income(max_rows=cfg.max_rows, seed=0)
    self.data = data
    self.task_names = tuple(data.task_names)
    self.T = data.num_tasks
    self.n_train = data.train.num_examples
    if self.n_train < cfg.batch_size:
      raise ValueError(f"batch size {cfg.batch_size} > {self.n_train} training rows")
    self.train = jax.device_put(data.train.as_dict())
    self.val_x = jax.device_put((data.val.cat, data.val.num))
    self.test_x = jax.device_put((data.test.cat, data.test.num))
    model_cls = mtl_models.MODELS[cfg.model]
    self._model_cls = model_cls
    graphdef, _ = nnx.split(self._build(0))
    self.graphdef = graphdef
    loss_fn = mtl_models.make_loss_fn(graphdef)
    self.loss_fn = loss_fn
    self.predict = mtl_models.make_predict_fn(graphdef)

    @jax.jit
    def grad_fn(params, train, idx):
      batch = jax.tree_util.tree_map(lambda x: x[idx], train)
      losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
      return losses, grads, gradcraft_jax.gradient_cosines(grads)

    self.grad_fn = grad_fn

  def row_update(self, opt):
    """The single-row Adam update, traced once for single-task and NMT."""
    if not hasattr(self, "_row_update"):
      self._row_update = make_row_update(opt)
    return self._row_update

  def _build(self, seed):
    return self._model_cls(
      self.data.cardinalities, self.data.num_numeric, self.T, rngs=nnx.Rngs(seed)
    )

  def init_params(self, seed):
    return nnx.split(self._build(seed))[1]

  def auc(self, params, split):
    x = self.val_x if split == "val" else self.test_x
    labels = self.data.val.labels if split == "val" else self.data.test.labels
    logits = np.asarray(self.predict(params, *x))
    if not np.all(np.isfinite(logits)):
      return None
    return np.asarray(mtl_models.auc(labels, logits), np.float64)


def make_update(tx):
  """Jitted ``(params, state, grads, losses, extra) -> (params, state)``."""

  @jax.jit
  def update(params, state, grads, losses, extra):
    upd, state = tx.update(grads, state, params, task_losses=losses, **extra)
    return optax.apply_updates(params, upd), state

  return update


def make_row_update(opt):
  """Jitted update of one task's row: ``opt`` on ``grads[task]``."""

  @jax.jit
  def update(params, state, grads, losses, extra):
    del losses
    g = jax.tree_util.tree_map(lambda x: x[extra["task"]], grads)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  return update


def make_prefix_update(tx, k):
  """Jitted update on the first ``k`` task rows (NMT stages)."""

  @jax.jit
  def update(params, state, grads, losses, extra):
    g = jax.tree_util.tree_map(lambda x: x[:k], grads)
    upd, state = tx.update(g, state, params, task_losses=losses[:k], **extra)
    return optax.apply_updates(params, upd), state

  return update


@dataclasses.dataclass
class RunResult:
  status: str  # "ok", "diverged: ...", "error: ..."
  test_auc: np.ndarray | None = None
  val_auc: np.ndarray | None = None
  best_step: int = 0
  steps: int = 0
  wall_s: float = 0.0
  losses: np.ndarray | None = None  # (steps, T) training losses
  cos_steps: np.ndarray | None = None  # (n_log,)
  cosines: np.ndarray | None = None  # (n_log, T, T)
  params: Any = None
  extra: dict = dataclasses.field(default_factory=dict)


def train_run(
  ctx: Context,
  update,
  params,
  state,
  *,
  seed: int,
  score: Callable[[np.ndarray], float],
  extra=None,
  desc: str = "",
  log_cosines: bool = True,
) -> RunResult:
  """Mini-batch training with early stopping on ``score(val_auc)``."""
  cfg = ctx.cfg
  extra = {} if extra is None else extra
  t0 = time.perf_counter()
  bs, n = cfg.batch_size, ctx.n_train
  per_epoch = n // bs
  rng = np.random.default_rng((seed, 12345))
  order = None
  best, best_params, best_step, best_val, bad = -np.inf, params, 0, None, 0
  losses, cos_steps, cosines = [], [], []
  status = "ok"
  step = 0
  for step in range(1, cfg.max_steps + 1):
    e, i = divmod(step - 1, per_epoch)
    if i == 0:
      order = rng.permutation(n).astype(np.int32)
    idx = order[i * bs : (i + 1) * bs]
    l, grads, cos = ctx.grad_fn(params, ctx.train, idx)
    params, state = update(params, state, grads, l, extra)
    losses.append(l)
    if log_cosines and (step - 1) % cfg.log_every == 0:
      cos_steps.append(step - 1)
      cosines.append(cos)
    if step % cfg.eval_every == 0 or step == cfg.max_steps:
      recent = np.asarray(jnp.stack(losses[-cfg.eval_every :]))
      if not np.all(np.isfinite(recent)):
        bad_step = step - len(recent) + int(np.argmax(~np.all(np.isfinite(recent), axis=1)))
        status = f"diverged: non-finite training loss at step {bad_step + 1}"
        break
      val = ctx.auc(params, "val")
      if val is None:
        status = f"diverged: non-finite predictions at step {step}"
        break
      s = score(val)
      if s > best:
        best, best_params, best_step, best_val, bad = s, params, step, val, 0
      else:
        bad += 1
        if bad >= cfg.patience:
          break
  res = RunResult(status=status, steps=step, best_step=best_step)
  res.losses = np.asarray(jnp.stack(losses)) if losses else None
  if cosines:
    res.cos_steps = np.asarray(cos_steps)
    res.cosines = np.asarray(jnp.stack(cosines))
  if status == "ok":
    res.val_auc = best_val
    res.test_auc = ctx.auc(best_params, "test")
    res.params = best_params
    if res.test_auc is None:
      res.status = "diverged: non-finite test predictions"
  res.wall_s = time.perf_counter() - t0
  return res


# --------------------------------------------------------------------------
# Methods.
# --------------------------------------------------------------------------


def _factory_kwargs(factory, T, seed):
  params = inspect.signature(factory).parameters
  kw = {}
  if "num_tasks" in params:
    kw["num_tasks"] = T
  if "seed" in params:
    kw["seed"] = seed
  return kw


class MethodRunner:
  """Builds (once) and runs a method over seeds; re-uses its jitted update."""

  def __init__(self, ctx: Context, name: str, hparams: dict | None = None):
    self.ctx, self.name = ctx, name
    self.hparams = dict(hparams or {})
    self.factory = getattr(gradcraft_jax, name, None)
    self._update = None

  def _tx(self, seed):
    kw = _factory_kwargs(self.factory, self.ctx.T, seed)
    kw.update(self.hparams)
    return optax.chain(self.factory(**kw), optax.adam(self.ctx.cfg.lr))

  def run(self, seed, params):
    seed_in_state = self.name in SEED_IN_STATE_ONLY
    if (
      self._update is None
      or not seed_in_state
      and "seed" in inspect.signature(self.factory).parameters
    ):
      self._update = make_update(self._tx(0 if seed_in_state else seed))
    state = self._tx(seed).init(params)
    return train_run(
      self.ctx, self._update, params, state, seed=seed, score=np.mean, desc=self.name
    )


class GradCraftRunner:
  """GradCraft with injected ``tau``/``eps``: one compile for grid and seeds."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.factory = optax.inject_hyperparams(
      gradcraft_jax.gradcraft, static_args=("num_tasks", "norm_decay")
    )
    self._update = make_update(self._tx(1.0, 0.0))

  def _tx(self, tau, eps):
    return optax.chain(
      self.factory(tau=tau, eps=eps, num_tasks=self.ctx.T), optax.adam(self.ctx.cfg.lr)
    )

  def run(self, seed, params, tau, eps):
    state = self._tx(tau, eps).init(params)
    res = train_run(
      self.ctx, self._update, params, state, seed=seed, score=np.mean, desc="gradcraft"
    )
    res.extra.update(tau=tau, eps=eps)
    return res


class SingleTaskRunner:
  """One run per task on that task's loss alone (Adam on its gradient)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.opt = optax.adam(ctx.cfg.lr)
    self._update = ctx.row_update(self.opt)

  def run(self, seed, params):
    T = self.ctx.T
    test, val, runs = np.full(T, np.nan), np.full(T, np.nan), []
    for t in range(T):
      res = train_run(
        self.ctx,
        self._update,
        params,
        self.opt.init(params),
        seed=seed,
        score=lambda a, t=t: float(a[t]),
        extra={"task": jnp.int32(t)},
        log_cosines=False,
      )
      runs.append(res)
      if res.status != "ok":
        return dataclasses.replace(res, status=f"{res.status} (task {self.ctx.task_names[t]})")
      test[t], val[t] = res.test_auc[t], res.val_auc[t]
    return RunResult(
      status="ok",
      test_auc=test,
      val_auc=val,
      best_step=max(r.best_step for r in runs),
      steps=sum(r.steps for r in runs),
      wall_s=sum(r.wall_s for r in runs),
      extra={"steps_per_task": [r.steps for r in runs]},
    )


class NMTRunner:
  """Three priority stages (task order = priority order)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    cfg = ctx.cfg
    self.opt = optax.adam(cfg.lr)
    self.stage0 = ctx.row_update(self.opt)
    self.txs, self.updates = {}, {}
    for k in range(1, ctx.T):
      # Targets are passed to every update (``targets=`` override), so one
      # trace serves every seed.
      tx = optax.chain(
        gradcraft_jax.nmt([0.0] * k, lagrange_lr=cfg.lagrange_lr, lagrange_clip=cfg.lagrange_clip),
        self.opt,
      )
      self.txs[k] = tx
      self.updates[k] = make_prefix_update(tx, k + 1)

  def run(self, seed, params):
    ctx, cfg = self.ctx, self.ctx.cfg
    targets, stages, all_losses = [], [], []
    for k in range(ctx.T):
      score = lambda a, k=k: float(np.mean(a[: k + 1]))
      if k == 0:
        res = train_run(
          ctx,
          self.stage0,
          params,
          self.opt.init(params),
          seed=seed + 100 * k,
          score=score,
          extra={"task": jnp.int32(0)},
          log_cosines=False,
        )
      else:
        res = train_run(
          ctx,
          self.updates[k],
          params,
          self.txs[k].init(params),
          seed=seed + 100 * k,
          score=score,
          extra={"targets": jnp.asarray(targets, jnp.float32)},
          log_cosines=False,
        )
      stages.append(res)
      if res.losses is not None:
        all_losses.append(res.losses)
      if res.status != "ok":
        return dataclasses.replace(
          res, status=f"{res.status} (stage {k + 1})", extra={"targets": targets}
        )
      lo = max(0, res.best_step - cfg.eval_every)
      targets.append(float(np.mean(res.losses[lo : res.best_step, k])))
      params = res.params
    final = stages[-1]
    return RunResult(
      status="ok",
      test_auc=final.test_auc,
      val_auc=final.val_auc,
      best_step=final.best_step,
      steps=sum(s.steps for s in stages),
      wall_s=sum(s.wall_s for s in stages),
      losses=np.concatenate(all_losses),
      extra={"targets": targets, "stage_steps": [s.steps for s in stages]},
    )


# --------------------------------------------------------------------------
# Table.
# --------------------------------------------------------------------------


def _fmt(mean, std, n):
  if n == 0 or not np.isfinite(mean):
    return "-"
  return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def summarise(results: dict, names: list, task_names) -> list[dict]:
  """One row per method: per-task AUC, AV-A, RI-A (mean, std over seeds)."""
  T = len(task_names)
  single = results.get(SINGLE, {})
  rows = []
  for name in names:
    runs = results.get(name)
    row = {"method": name, "n_ok": 0, "n_seeds": 0, "n_ri": 0, "note": ""}
    if isinstance(runs, str):  # "missing" or a build error
      row["note"] = runs
      rows.append(row)
      continue
    row["n_seeds"] = len(runs)
    ok = {s: r for s, r in runs.items() if r.status == "ok"}
    fails = [f"seed {s}: {r.status}" for s, r in runs.items() if r.status != "ok"]
    row["note"] = "; ".join(fails)
    row["n_ok"] = len(ok)
    aucs = np.array([ok[s].test_auc for s in ok]).reshape(-1, T)
    for t, tn in enumerate(task_names):
      row[f"{tn}_mean"] = float(np.mean(aucs[:, t])) if len(ok) else np.nan
      row[f"{tn}_std"] = float(np.std(aucs[:, t])) if len(ok) else np.nan
    ava = aucs.mean(axis=1)
    row["AV-A_mean"] = float(np.mean(ava)) if len(ok) else np.nan
    row["AV-A_std"] = float(np.std(ava)) if len(ok) else np.nan
    ri = [
      100 * np.mean((ok[s].test_auc - single[s].test_auc) / single[s].test_auc)
      for s in ok
      if isinstance(single, dict) and s in single and single[s].status == "ok"
    ]
    row["RI-A_mean"] = float(np.mean(ri)) if ri else np.nan
    row["RI-A_std"] = float(np.std(ri)) if ri else np.nan
    row["n_ri"] = len(ri)
    row["steps"] = float(np.mean([r.steps for r in ok.values()])) if ok else np.nan
    row["wall_s"] = float(sum(r.wall_s for r in runs.values()))
    rows.append(row)
  return rows


def table_markdown(rows, task_names) -> str:
  cols = [f"{t}" for t in task_names] + ["AV-A", "RI-A (%)"]
  keys = list(task_names) + ["AV-A", "RI-A"]
  best = {}
  for k in keys:  # best among the multi-task methods (not the reference)
    vals = [r.get(f"{k}_mean", np.nan) for r in rows if r["method"] != SINGLE]
    vals = [v for v in vals if np.isfinite(v)]
    best[k] = max(vals) if vals else None
  lines = ["| Method | " + " | ".join(cols) + " | Notes |", "|---|" + "---:|" * len(cols) + "---|"]
  for r in rows:
    cells = []
    for k in keys:
      m = r.get(f"{k}_mean", np.nan)
      n = r["n_ri"] if k == "RI-A" else r["n_ok"]
      if k == "RI-A" and r["method"] == SINGLE:
        cells.append("0 (reference)" if r["n_ok"] else "-")
        continue
      if k == "RI-A" and np.isfinite(m):
        cell = f"{m:+.3f} ± {r['RI-A_std']:.3f}" if n > 1 else f"{m:+.3f}"
      else:
        cell = _fmt(m, r.get(f"{k}_std", np.nan), n)
      if r["method"] != SINGLE and best[k] is not None and np.isfinite(m) and m == best[k]:
        cell = f"**{cell}**"
      cells.append(cell)
    note = r["note"]
    if r["n_seeds"] and r["n_ok"] < r["n_seeds"]:
      note = f"{r['n_ok']}/{r['n_seeds']} seeds ok; " + note
    lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {note.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


def table_csv(rows, task_names) -> str:
  keys = [f"{t}_{s}" for t in list(task_names) + ["AV-A", "RI-A"] for s in ("mean", "std")]
  head = ["method", "n_ok", "n_seeds"] + keys + ["steps", "wall_s", "note"]
  out = [",".join(head)]
  for r in rows:
    vals = [r["method"], str(r["n_ok"]), str(r["n_seeds"])]
    for k in keys + ["steps", "wall_s"]:
      v = r.get(k, np.nan)
      vals.append("" if not np.isfinite(v) else f"{v:.6g}")
    vals.append('"' + r["note"].replace('"', "'") + '"')
    out.append(",".join(vals))
  return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def plot_auc(rows, task_names, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = list(task_names) + ["AV-A"]
  ok = [r for r in rows if r["n_ok"]]
  names = [r["method"] for r in ok]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 5.2), sharey=True)
  colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
  y = np.arange(len(names))
  for ax, k in zip(axes, keys):
    m = np.array([r[f"{k}_mean"] for r in ok])
    s = np.array([r[f"{k}_std"] for r in ok])
    ax.barh(y, m, xerr=s, color=colors[: len(names)], capsize=3)
    lo, hi = np.nanmin(m - s), np.nanmax(m + s)
    pad = max(0.1 * (hi - lo), 1e-3)
    ax.set_xlim(lo - pad, hi + pad)
    if SINGLE in names:
      ax.axvline(m[names.index(SINGLE)], color="k", ls="--", lw=0.8)
    ax.set_title(f"test AUC: {k}")
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(y)
  axes[0].set_yticklabels(names)
  axes[0].invert_yaxis()
  fig.suptitle("Census-Income: test AUC by method (mean ± std over seeds; dashed: single-task)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _smooth(x, w):
  if len(x) < w or w <= 1:
    return x
  k = np.ones(w) / w
  return np.stack([np.convolve(x[:, t], k, mode="valid") for t in range(x.shape[1])], axis=1)


def plot_curves(results, task_names, path, window):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  T = len(task_names)
  fig, axes = plt.subplots(1, T, figsize=(5 * T, 4))
  styles = dict(zip(CURVE_METHODS, ("-", "--", "-.", ":")))
  for name in CURVE_METHODS:
    runs = results.get(name)
    if not isinstance(runs, dict) or 0 not in runs or runs[0].losses is None:
      continue
    r = runs[0]
    sm = _smooth(r.losses, window)
    x = np.arange(len(sm)) + (len(r.losses) - len(sm)) + 1
    for t in range(T):
      (line,) = axes[t].plot(x, sm[:, t], label=name, lw=1.2, ls=styles[name])
      if r.best_step:
        axes[t].axvline(r.best_step, color=line.get_color(), ls=":", lw=0.8)
  for t in range(T):
    axes[t].set_title(f"training loss: {task_names[t]}")
    axes[t].set_xlabel("step")
    axes[t].grid(alpha=0.3)
  axes[0].set_ylabel(f"BCE (moving average over {window} steps)")
  axes[-1].legend()
  fig.suptitle("Per-task training loss, seed 0 (dotted: selected checkpoint)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def cosine_phases(r: RunResult):
  """Mean cosine matrix over the first, middle and last tenth of the logs."""
  n = len(r.cosines)
  w = max(1, n // 10)
  mid = n // 2
  phases = [
    ("start", slice(0, w)),
    ("middle", slice(max(0, mid - w // 2), max(1, mid - w // 2 + w))),
    ("end", slice(n - w, n)),
  ]
  out = []
  for label, sl in phases:
    steps = r.cos_steps[sl]
    out.append((f"{label}: steps {steps[0]}-{steps[-1]}", r.cosines[sl].mean(axis=0)))
  return out


def plot_cosines(results, task_names, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  avail = [
    m
    for m in COSINE_METHODS
    if isinstance(results.get(m), dict) and 0 in results[m] and results[m][0].cosines is not None
  ]
  if not avail:
    return False
  T = len(task_names)
  fig, axes = plt.subplots(
    len(avail),
    4,
    figsize=(17, 3.9 * len(avail)),
    squeeze=False,
    gridspec_kw={"width_ratios": [1, 1, 1, 1.6]},
  )
  short = [t[:10] for t in task_names]
  for row, name in enumerate(avail):
    r = results[name][0]
    for col, (label, c) in enumerate(cosine_phases(r)):
      ax = axes[row, col]
      im = ax.imshow(c, vmin=-1, vmax=1, cmap="RdBu_r")
      for i in range(T):
        for j in range(T):
          ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=9)
      ax.set_xticks(range(T))
      ax.set_xticklabels(short, rotation=30)
      ax.set_yticks(range(T))
      ax.set_yticklabels(short if col == 0 else [])
      ax.set_title(f"{name}, {label}", fontsize=9)
    ax = axes[row, 3]
    for i in range(T):
      for j in range(i + 1, T):
        ax.plot(r.cos_steps, r.cosines[:, i, j], lw=0.8, label=f"{short[i]} / {short[j]}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(f"{name}: pairwise cosine per logged step (training batch)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.colorbar(im, ax=axes[row, :3].tolist(), shrink=0.8)
  fig.suptitle(
    "Task-gradient cosine similarity (all parameters, seed 0, gradcraft_jax.gradient_cosines)"
  )
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return True


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def _error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"error: {type(e).__name__}: {msg[:120]}"


def _run_safe(fn, *args, **kwargs) -> RunResult:
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # reported in the table, never dropped
    traceback.print_exc(limit=3, file=sys.stderr)
    return RunResult(status=_error(e))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="out/census", help="output directory")
  ap.add_argument(
    "--quick", action="store_true", help="same pipeline on a slice of the data, 1 seed"
  )
  ap.add_argument("--model", choices=sorted(mtl_models.MODELS), default="shared_bottom")
  for f in ("seeds", "batch_size", "max_steps", "eval_every", "patience", "max_rows", "log_every"):
    ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
  ap.add_argument("--lr", type=float, default=None)
  ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(METHODS))
  ap.add_argument(
    "--no-grid", action="store_true", help="skip GradCraft's tau/eps grid (use tau=0.6, eps=0.05)"
  )
  ap.add_argument("--no-single", action="store_true", help="skip the single-task models (no RI-A)")
  ap.add_argument("--no-nmt", action="store_true", help="skip NMT")
  args = ap.parse_args(argv)
  cfg = Config(model=args.model)
  if args.quick:
    for k, v in QUICK.items():
      setattr(cfg, k, v)
  for k in (
    "seeds",
    "batch_size",
    "max_steps",
    "eval_every",
    "patience",
    "max_rows",
    "log_every",
    "lr",
  ):
    v = getattr(args, k)
    if v is not None:
      setattr(cfg, k, v)
  if args.methods:
    names = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown:
      ap.error(f"unknown methods {unknown}")
    cfg.methods = names
  cfg.grid = not args.no_grid
  return args, cfg


def main(argv=None):
  args, cfg = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  ctx = Context(cfg)
  names = ctx.task_names
  print(
    f"Census-Income: train {ctx.n_train}, val "
    f"{ctx.data.val.num_examples}, test {ctx.data.test.num_examples} "
    f"rows; tasks {names}; model {cfg.model}; device "
    f"{jax.devices()[0].platform}"
  )
  print(f"config: {dataclasses.asdict(cfg)}")
  seeds = list(range(cfg.seeds))
  params0 = {s: ctx.init_params(s) for s in seeds}
  results: dict[str, Any] = {}
  order = ([] if args.no_single else [SINGLE]) + list(cfg.methods) + ([] if args.no_nmt else [NMT])
  available = {m: getattr(gradcraft_jax, m, None) is not None for m in cfg.methods}
  for m, ok in available.items():
    if not ok:
      results[m] = "missing (not exported by gradcraft_jax yet)"

  grid_runs = len(GRID_TAU) * len(GRID_EPS) if cfg.grid and "gradcraft" in cfg.methods else 0
  total = grid_runs + len(seeds) * sum(1 for m in order if not isinstance(results.get(m), str))
  bar = tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True)

  # GradCraft grid on seed 0 (selection on validation AUC).
  chosen = {"tau": 0.6, "eps": 0.05}
  gc_runner, gc_seed0 = None, None
  grid_rows = []
  if "gradcraft" in cfg.methods:
    try:
      gc_runner = GradCraftRunner(ctx)
    except Exception as e:
      traceback.print_exc(limit=3, file=sys.stderr)
      results["gradcraft"] = _error(e)
  if gc_runner is not None and cfg.grid:
    best = -np.inf
    for tau in GRID_TAU:
      for eps in GRID_EPS:
        bar.set_postfix_str(f"gradcraft grid tau={tau} eps={eps}")
        r = _run_safe(gc_runner.run, 0, params0[0], tau, eps)
        bar.update(1)
        v = float(np.mean(r.val_auc)) if r.status == "ok" else np.nan
        grid_rows.append(
          {"tau": tau, "eps": eps, "val_AV-A": v, "status": r.status, "steps": r.steps}
        )
        if np.isfinite(v) and v > best:
          best, chosen, gc_seed0 = v, {"tau": tau, "eps": eps}, r
    lines = [
      "| tau \\ eps | " + " | ".join(str(e) for e in GRID_EPS) + " |",
      "|---|" + "---:|" * len(GRID_EPS),
    ]
    for tau in GRID_TAU:
      cells = []
      for eps in GRID_EPS:
        g = next(x for x in grid_rows if x["tau"] == tau and x["eps"] == eps)
        c = f"{g['val_AV-A']:.5f}" if np.isfinite(g["val_AV-A"]) else g["status"]
        if g["tau"] == chosen["tau"] and g["eps"] == chosen["eps"]:
          c = f"**{c}**"
        cells.append(c)
      lines.append(f"| {tau} | " + " | ".join(cells) + " |")
    grid_md = "\n".join(lines) + "\n"
    print("\nGradCraft grid, seed 0, validation AV-A (mean AUC over tasks):")
    print(grid_md)
    print(f"chosen: tau={chosen['tau']}, eps={chosen['eps']}")
  else:
    grid_md = f"(no grid: tau={chosen['tau']}, eps={chosen['eps']})\n"

  runners: dict[str, Any] = {}
  for m in order:
    if isinstance(results.get(m), str):
      continue
    try:
      if m == SINGLE:
        runners[m] = SingleTaskRunner(ctx)
      elif m == NMT:
        runners[m] = NMTRunner(ctx)
      elif m == "gradcraft":
        runners[m] = gc_runner
      elif m == "pcgrad_plus":
        runners[m] = MethodRunner(ctx, m, hparams=chosen)
      else:
        runners[m] = MethodRunner(ctx, m)
    except Exception as e:
      traceback.print_exc(limit=3, file=sys.stderr)
      results[m] = _error(e)
      bar.update(len(seeds))

  for m in order:
    if isinstance(results.get(m), str):
      continue
    results[m] = {}
    for s in seeds:
      bar.set_postfix_str(f"{m} seed {s}")
      if m == "gradcraft" and s == 0 and gc_seed0 is not None:
        r = gc_seed0
      elif m == "gradcraft":
        r = _run_safe(runners[m].run, s, params0[s], chosen["tau"], chosen["eps"])
      else:
        r = _run_safe(runners[m].run, s, params0[s])
      results[m][s] = r
      bar.update(1)
      tail = f"test AUC {np.round(r.test_auc, 4).tolist()}" if r.status == "ok" else r.status
      _write(f"  {m:<22} seed {s}: {tail} ({r.steps} steps, {r.wall_s:.1f} s)")
  bar.close()
  wall = time.perf_counter() - t_start

  rows = summarise(results, order, names)
  md = table_markdown(rows, names)
  header = (
    f"Census-Income, model `{cfg.model}`, {len(seeds)} seed(s), "
    f"test AUC at the best validation checkpoint (mean ± std over "
    f"seeds). AV-A: mean AUC over tasks; RI-A: mean over tasks of "
    f"(AUC - AUC_single) / AUC_single, in %. Bold: best multi-task "
    f"method per column."
    + (
      f" GradCraft: tau={chosen['tau']}, eps={chosen['eps']} ("
      + ("chosen on validation" if grid_rows else "fixed, no grid")
      + ")."
      if "gradcraft" in cfg.methods
      else ""
    )
    + "\n\n"
  )
  print("\n" + header + md)
  print(f"wall time {wall:.1f} s on {jax.devices()[0].platform}")
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(
      header
      + md
      + "\n\nGradCraft grid (seed 0, validation AV-A):\n\n"
      + grid_md
      + f"\nWall time: {wall:.1f} s "
      f"({jax.devices()[0].platform}).\n"
    )
  with open(os.path.join(args.out, "table.csv"), "w") as f:
    f.write(table_csv(rows, names))

  plot_auc(rows, names, os.path.join(args.out, "auc_by_method.png"))
  plot_curves(
    results, names, os.path.join(args.out, "curves.png"), window=max(1, cfg.eval_every // 2)
  )
  if not plot_cosines(results, names, os.path.join(args.out, "grad_cosines.png")):
    print("no cosine logs (mean/gradcraft not run): grad_cosines.png not written")

  summary = {
    "config": dataclasses.asdict(cfg),
    "wall_s": wall,
    "device": str(jax.devices()[0]),
    "chosen": chosen,
    "grid": grid_rows,
    "rows": [
      {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
      for r in rows
    ],
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
      for m, v in results.items()
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
