"""Data, the jitted training step with conflict diagnostics, the training
loop and the runners (one per kind of table entry).

Training (identical for every entry of a backbone): mini-batches of
``batch_size`` rows drawn epoch by epoch in a seeded order shared by all
methods of a seed, from the same initial parameters per seed, Adam after
the method at the learning rate of the run (injected:
``optax.inject_hyperparams``, so one traced update serves every learning
rate and every injected hyperparameter value); the mean validation AUC over
the tasks the run optimises is evaluated every ``eval_every`` steps;
training stops after ``patience`` evaluations without improvement or at
``max_steps``; the test AUC is measured once, at the best validation
checkpoint, and only for final runs (tuning trials never read it). A run
whose training loss or predictions become non-finite is reported as
diverged.

Conflict diagnostics: at every step the pairwise cosines of the task
gradients, from the Gram matrix of all parameters and from the Gram matrix
of the shared parameters only (the leaves that receive gradient from at
least two tasks), via :func:`gradcraft_jax.diagnostics.cosines_from_gram`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import early_stopping
import jax
import jax.numpy as jnp
import mtl_models
import numpy as np
import optax
from flax import nnx

import gradcraft_jax
from gradcraft_jax.datasets import load_census_income
from gradcraft_jax.diagnostics import cosines_from_gram

from . import methods as M


@dataclasses.dataclass
class Config:
  model: str = "shared_bottom"
  seeds: int = 3
  batch_size: int = 1024
  lrs: tuple = (3e-3, 1e-2)  # the learning-rate grid of every entry
  trials: int = 2  # settings of each method's own hyperparameters (tuning.HPARAMS)
  max_steps: int = 400
  eval_every: int = 50
  patience: int = 3
  max_rows: int | None = None
  lagrange_lr: float = 1.0
  lagrange_clip: float = 10.0
  alpha: float = 0.05  # family-wise level of Holm's procedure


@dataclasses.dataclass
class RunResult:
  status: str  # "ok", "diverged: ...", "error: ...", "skipped: ..."
  test_auc: np.ndarray | None = None
  val_auc: np.ndarray | None = None
  best_step: int = 0
  steps: int = 0
  wall_s: float = 0.0
  losses: np.ndarray | None = None  # (steps, T) training losses (before each update)
  cos_all: np.ndarray | None = None  # (steps, T(T-1)/2) pairwise cosines, all parameters
  cos_shared: np.ndarray | None = None  # (steps, T(T-1)/2) shared parameters only
  params: Any = None
  extra: dict = dataclasses.field(default_factory=dict)


def shared_leaf_mask(per_task_grads) -> Any:
  """``True`` for leaves where some element receives gradient from >= 2 tasks.

  Evaluated once on a batch: towers (used by one task) and per-task gates
  (one task per slice) are task-specific; the embedding, the bottom, the
  experts are shared. A leaf mixing both (PLE's last-level experts, shared
  and task-specific experts in one array) counts as shared.
  """
  counts = jax.tree.map(lambda g: int(jnp.max(jnp.sum(g != 0, axis=0))), per_task_grads)
  return jax.tree.map(lambda c: c >= 2, counts)


class Context:
  """Data on device and the jitted functions shared by every run of a backbone."""

  def __init__(self, cfg: Config, data=None):
    self.cfg = cfg
    data = data if data is not None else load_census_income(max_rows=cfg.max_rows, seed=0)
    self.data = data
    self.task_names = tuple(data.task_names)
    self.T = data.num_tasks
    self.n_train = data.train.num_examples
    if self.n_train < cfg.batch_size:
      raise ValueError(f"batch size {cfg.batch_size} > {self.n_train} training rows")
    self.train = jax.device_put(data.train.as_dict())
    self.val_x = jax.device_put((data.val.cat, data.val.num))
    self.test_x = jax.device_put((data.test.cat, data.test.num))
    self._model_cls = mtl_models.MODELS[cfg.model]
    graphdef, params = nnx.split(self._build(0))
    self.graphdef = graphdef
    self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    loss_fn = mtl_models.make_loss_fn(graphdef)
    self.loss_fn = loss_fn
    self.predict = jax.jit(mtl_models.make_predict_fn(graphdef))
    per_task = jax.jit(gradcraft_jax.per_task_value_and_grad(loss_fn))
    idx0 = np.arange(cfg.batch_size, dtype=np.int32)
    _, g0 = per_task(params, jax.tree.map(lambda x: x[idx0], self.train))
    self.shared_mask = shared_leaf_mask(g0)
    mask_leaves = jax.tree.leaves(self.shared_mask)
    self.num_shared = int(sum(x.size for x, m in zip(jax.tree.leaves(params), mask_leaves) if m))
    iu = np.triu_indices(self.T, 1)
    self.pairs = [(self.task_names[i], self.task_names[j]) for i, j in zip(*iu)]

    @jax.jit
    def grad_fn(params, train, idx):
      batch = jax.tree.map(lambda x: x[idx], train)
      losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
      leaves = jax.tree.leaves(grads)
      shared = [g for g, m in zip(leaves, mask_leaves) if m]
      c_all = cosines_from_gram(gradcraft_jax.gram_matrix(leaves))[iu]
      c_sh = cosines_from_gram(gradcraft_jax.gram_matrix(shared))[iu]
      return losses, grads, c_all, c_sh

    self.grad_fn = grad_fn
    self._row_update = None

  def row_update(self, opt):
    """The single-row Adam update, traced once for single-task and NMT."""
    if self._row_update is None:
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
    g = jax.tree.map(lambda x: x[extra["task"]], grads)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  return update


def make_prefix_update(tx, k):
  """Jitted update on the first ``k`` task rows (NMT stages)."""

  @jax.jit
  def update(params, state, grads, losses, extra):
    g = jax.tree.map(lambda x: x[:k], grads)
    upd, state = tx.update(g, state, params, task_losses=losses[:k], **extra)
    return optax.apply_updates(params, upd), state

  return update


def train_run(
  ctx: Context,
  update,
  params,
  state,
  *,
  seed: int,
  score: Callable[[np.ndarray], float],
  extra=None,
  log_cosines: bool = True,
  evaluate_test: bool = True,
  second_batch: bool = False,
) -> RunResult:
  """Mini-batch training with early stopping on ``score(val_auc)``.

  With ``evaluate_test=False`` (grid runs, early NMT stages) the test split
  is not read; :func:`evaluate_test_split` does it later for the selected run.
  ``second_batch``: pass the stacked gradients of a second, independent
  mini-batch (drawn with replacement from its own stream) as ``stacked_2``.
  """
  cfg = ctx.cfg
  extra = {} if extra is None else extra
  t0 = time.perf_counter()

  def step(params, state, idx, idx2):
    loss, grads, ca, cs = ctx.grad_fn(params, ctx.train, idx)
    step_extra = extra
    if second_batch:
      step_extra = {**extra, "stacked_2": ctx.grad_fn(params, ctx.train, idx2)[1]}
    params, state = update(params, state, grads, loss, step_extra)
    return params, state, loss, (ca, cs) if log_cosines else None

  loop = early_stopping.train(
    params,
    state,
    step,
    lambda p: ctx.auc(p, "val"),
    score,
    n=ctx.n_train,
    batch_size=cfg.batch_size,
    max_steps=cfg.max_steps,
    eval_every=cfg.eval_every,
    patience=cfg.patience,
    seed=seed,
  )
  res = RunResult(status=loop.status, steps=loop.steps, best_step=loop.best_step)
  res.losses = np.asarray(jnp.stack(loop.losses)) if loop.losses else None
  if log_cosines and loop.diagnostics:
    res.cos_all = np.asarray(jnp.stack([d[0] for d in loop.diagnostics]))
    res.cos_shared = np.asarray(jnp.stack([d[1] for d in loop.diagnostics]))
  if loop.status == "ok":
    res.val_auc = loop.best_val
    res.params = loop.best_params
    if evaluate_test:
      evaluate_test_split(ctx, res)
  res.wall_s = time.perf_counter() - t0
  return res


def evaluate_test_split(ctx: Context, res: RunResult) -> RunResult:
  """The one look at the test split, at the selected checkpoint."""
  res.test_auc = ctx.auc(res.params, "test")
  if res.test_auc is None:
    res.status = "diverged: non-finite test predictions"
  return res


# --------------------------------------------------------------------------
# Runners.
# --------------------------------------------------------------------------


def adam(lr: float):
  """Adam with its learning rate in the state (one trace for every rate)."""
  return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


class MethodRunner:
  """A library method (whole model or shared parameters only) over seeds.

  ``tuned``: the hyperparameter names the runs vary (injected, one trace);
  ``run(seed, params, lr, hparams)`` trains with those values.
  """

  def __init__(self, ctx: Context, name: str, *, shared: bool = False, tuned=()):
    self.ctx, self.name, self.shared = ctx, name, shared
    self.tuned = tuple(tuned)
    self.factory = M.factory_of(name)
    self.uses_seed = "seed" in M.factory_kwargs(self.factory, ctx.T, 0)
    self._updates = {}
    # Build once (raises Skip with the reason when it cannot run).
    params = ctx.init_params(0)
    self.reads_gram = M.probe(M.make_method(name, ctx.T, 0), params, ctx.T, name=name)
    self.second_batch = name in M.SECOND_BATCH

  def _tx(self, seed, lr, hparams):
    tx = M.make_injected(self.name, self.ctx.T, seed, hparams, self.tuned)
    if self.shared:
      tx = M.wrap_shared(tx, self.ctx.shared_mask)
    return optax.chain(tx, adam(lr))

  def run(self, seed, params, lr, hparams=None, *, evaluate_test=True):
    hparams = dict(hparams or {})
    trace_seed = 0 if self.name in M.SEED_IN_STATE_ONLY or not self.uses_seed else seed
    key = (trace_seed,) if self.tuned else (trace_seed, tuple(sorted(hparams.items())))
    if key not in self._updates:
      self._updates[key] = make_update(self._tx(trace_seed, lr, hparams))
    state = self._tx(seed, lr, hparams).init(params)
    res = train_run(
      self.ctx,
      self._updates[key],
      params,
      state,
      seed=seed,
      score=np.mean,
      evaluate_test=evaluate_test,
      second_batch=self.second_batch,
    )
    res.extra.update(lr=lr, hparams=hparams)
    return res


class SingleTaskRunner:
  """One run per task on that task's loss alone (Adam on its gradient)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self._update = ctx.row_update(adam(1.0))

  def run_task(self, seed, params, lr, task, *, evaluate_test=True):
    opt = adam(lr)
    res = train_run(
      self.ctx,
      self._update,
      params,
      opt.init(params),
      seed=seed,
      score=lambda a, t=task: float(a[t]),
      extra={"task": jnp.int32(task)},
      log_cosines=False,
      evaluate_test=evaluate_test,
    )
    res.extra.update(task=task, lr=lr)
    return res

  def combine(self, runs: list) -> RunResult:
    """The per-task runs as one entry: task ``t``'s AUC from its own model."""
    for t, res in enumerate(runs):
      if res.status != "ok":
        return dataclasses.replace(res, status=f"{res.status} (task {self.ctx.task_names[t]})")
    T = self.ctx.T
    test, val = np.full(T, np.nan), np.full(T, np.nan)
    for t, res in enumerate(runs):
      val[t] = res.val_auc[t]
      if res.test_auc is not None:
        test[t] = res.test_auc[t]
    return RunResult(
      status="ok",
      test_auc=test if all(r.test_auc is not None for r in runs) else None,
      val_auc=val,
      best_step=max(r.best_step for r in runs),
      steps=sum(r.steps for r in runs),
      wall_s=sum(r.wall_s for r in runs),
      extra={"steps_per_task": [r.steps for r in runs], "lr": [r.extra["lr"] for r in runs]},
    )


class NMTRunner:
  """Priority stages (task order = priority order: income > never_married > education).

  Stage 1 trains the first task alone; stage ``k + 1`` trains task ``k``
  under ``l_j <= target_j`` for the tasks before it. Each stage early-stops
  (on the mean validation AUC of the tasks trained so far) and starts from
  the previous stage's selected parameters with a fresh Adam state and fresh
  multipliers. The target of a task is its mean training loss over the last
  evaluation period before the selected checkpoint of its stage.
  """

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.stage0 = ctx.row_update(adam(1.0))
    self.updates = {k: make_prefix_update(self._tx(k, 1.0), k + 1) for k in range(1, ctx.T)}

  def _tx(self, k, lr):
    # Targets are passed to every update (``targets=`` override): one trace for every seed.
    cfg = self.ctx.cfg
    nmt = gradcraft_jax.nmt([0.0] * k, lagrange_lr=cfg.lagrange_lr, lagrange_clip=cfg.lagrange_clip)
    return optax.chain(nmt, adam(lr))

  def run(self, seed, params, lr, hparams=None, *, evaluate_test=True):
    ctx, cfg = self.ctx, self.ctx.cfg
    targets, stages = [], []
    for k in range(ctx.T):
      score = lambda a, k=k: float(np.mean(a[: k + 1]))
      if k == 0:
        update, state, extra = self.stage0, adam(lr).init(params), {"task": jnp.int32(0)}
      else:
        update, state = self.updates[k], self._tx(k, lr).init(params)
        extra = {"targets": jnp.asarray(targets, jnp.float32)}
      res = train_run(
        ctx,
        update,
        params,
        state,
        seed=seed + 100 * k,
        score=score,
        extra=extra,
        evaluate_test=evaluate_test and k == ctx.T - 1,
      )
      stages.append(res)
      if res.status != "ok":
        return dataclasses.replace(
          res, status=f"{res.status} (stage {k + 1})", extra={"targets": targets}
        )
      lo = max(0, res.best_step - cfg.eval_every)
      targets.append(float(np.mean(res.losses[lo : res.best_step, k])))
      params = res.params
    final = stages[-1]

    def cat(key):
      parts = [getattr(s, key) for s in stages if getattr(s, key) is not None]
      return np.concatenate(parts) if parts else None

    return RunResult(
      status="ok",
      test_auc=final.test_auc,
      val_auc=final.val_auc,
      best_step=final.best_step,
      steps=sum(s.steps for s in stages),
      wall_s=sum(s.wall_s for s in stages),
      losses=cat("losses"),
      cos_all=cat("cos_all"),
      cos_shared=cat("cos_shared"),
      params=final.params,
      extra={"targets": targets, "stage_steps": [s.steps for s in stages], "lr": lr},
    )
