"""Data on device, the jitted steps, evaluation, the training loop and the
runners (a library method, the single-task models, NMT).

Training (identical for every entry of a backbone): the training rows (see
``data.training_rows``) in a seeded order shared by every entry of a seed,
mini-batches of ``batch_size``, Adam (``optax.scale_by_adam``) after the
method with the learning rate of the trial, from the same initial parameters
per seed. The validation split is evaluated ``evals_per_epoch`` times per
epoch; training stops after ``patience`` evaluations without improvement of
the validation score or after ``max_epochs``; the test split is evaluated
once, at the selected checkpoint, and only for final runs (a tuning trial
never reads it). A run whose training loss or predictions become non-finite
is reported as diverged.

Validation score: the mean over the tasks a run optimises of the
improvement over a constant predictor (``metrics.skill``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import early_stopping
import jax
import jax.numpy as jnp
import numpy as np
import optax
from census_bench import methods as M

import gradcraft_jax
from gradcraft_jax.diagnostics import cosines_from_gram

from . import data as D
from . import metrics as X
from . import model as Mo


@dataclasses.dataclass
class Config:
  batch_size: int = 1024
  neg_ratio: int = 4
  max_epochs: float = 6.0
  evals_per_epoch: int = 2
  patience: int = 2
  eval_negatives: int = 99
  k: int = 10
  holdout: int = 1
  max_users: int | None = None
  data_seed: int = 0
  eval_block: int = 8192
  lagrange_lr: float = 1.0
  lagrange_clip: float = 10.0


@dataclasses.dataclass
class RunResult:
  status: str  # "ok", "diverged: ...", "error: ..."
  val: dict | None = None  # validation metrics at the selected checkpoint
  test: dict | None = None  # test metrics (final runs only)
  score: float = float("nan")  # validation score of the selected checkpoint
  best_step: int = 0
  steps: int = 0
  wall_s: float = 0.0
  losses: np.ndarray | None = None  # (steps, T) training losses (before each update)
  cos: np.ndarray | None = None  # (steps, T(T-1)/2) pairwise task-gradient cosines
  params: Any = None
  extra: dict = dataclasses.field(default_factory=dict)


METRICS = ("click_auc", "like_auc", "rmse", "hr", "ndcg")


class Context:
  """Everything shared by the runs of one backbone."""

  def __init__(self, ml: D.MovieLens, sp: D.Split, rows: dict, cfg: Config, model: str, mc=None):
    self.cfg, self.model = cfg, model
    self.ml, self.sp = ml, sp
    self.task_names = Mo.TASKS
    self.T = len(Mo.TASKS)
    self.n_train = int(rows["user"].size)
    if self.n_train < cfg.batch_size:
      raise ValueError(f"batch size {cfg.batch_size} > {self.n_train} training rows")
    self.mean_rating = float(np.mean(sp.train["rating"]))
    self.train = jax.device_put(rows)
    mc = mc or Mo.ModelConfig()
    tables = {"user_side": ml.user_side, "item_side": ml.item_side, "item_genres": ml.item_genres}
    tables["sequences"] = sp.sequences
    self.tables = jax.device_put(tables)
    self.graphdef, self.abstract = Mo.build(model, ml, mc)
    hist = np.arange(-mc.history_len, 0, dtype=np.int32)
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract)))
    loss_fn = Mo.make_loss_fn(self.graphdef, self.mean_rating)
    out_fn = Mo.make_output_fn(self.graphdef)
    iu = np.triu_indices(self.T, 1)
    self.pairs = [(self.task_names[i], self.task_names[j]) for i, j in zip(*iu)]

    def features(tables, user, item, pos):
      """Side features, genres and the last ``history_len`` training items before ``pos``."""
      side = jnp.concatenate([tables["user_side"][user], tables["item_side"][item]], axis=1)
      at = pos[:, None] + hist[None, :]  # (B, L) positions in the user's sequence
      history = jnp.where(at >= 0, tables["sequences"][user[:, None], jnp.maximum(at, 0)], 0)
      return {
        "user": user,
        "item": item,
        "history": history,
        "side": side,
        "genres": tables["item_genres"][item],
      }

    @jax.jit
    def grad_fn(params, train, tables, idx):
      rows = jax.tree.map(lambda x: x[idx], train)
      batch = {**rows, **features(tables, rows["user"], rows["item"], rows["pos"])}
      losses, grads = gradcraft_jax.per_task_value_and_grad(loss_fn)(params, batch)
      cos = cosines_from_gram(gradcraft_jax.gram_matrix(jax.tree.leaves(grads)))[iu]
      return losses, grads, cos

    @jax.jit
    def predict(params, tables, user, item, pos):
      return out_fn(params, features(tables, user, item, pos))

    self._grad_fn, self._predict = grad_fn, predict
    self.eval_sets = {}
    for name, held, seed in (("val", sp.val, 1), ("test", sp.test, 2)):
      if held["user"].size == 0:
        raise ValueError(f"no {name} interactions (every user has too few interactions)")
      cand = D.eval_candidates(ml, held, cfg.eval_negatives, (cfg.data_seed, seed))
      self.eval_sets[name] = {
        "user": np.repeat(held["user"], cand.shape[1]).astype(np.int32),
        "item": cand.reshape(-1),
        "pos": np.repeat(held["pos"], cand.shape[1]).astype(np.int32),
        "shape": cand.shape,
        "rating": held["rating"].astype(np.float64),
        "rmse_constant": X.rmse(np.full(held["rating"].shape, self.mean_rating), held["rating"]),
      }

  def grad(self, params, idx):
    return self._grad_fn(params, self.train, self.tables, idx)

  def init_params(self, seed):
    return Mo.init_params(self.abstract, seed)

  def outputs(self, params, split: str) -> np.ndarray:
    """``(n, 1 + K, 3)`` outputs on the candidates of ``split``."""
    e = self.eval_sets[split]
    n, blk = e["user"].size, self.cfg.eval_block
    pad = -n % blk
    user, item, pos = (
      np.concatenate([e[k], np.ones(pad, np.int32)]) for k in ("user", "item", "pos")
    )
    outs = [
      np.asarray(
        self._predict(params, self.tables, user[i : i + blk], item[i : i + blk], pos[i : i + blk])
      )
      for i in range(0, n + pad, blk)
    ]
    return np.concatenate(outs)[:n].reshape(*e["shape"], self.T)

  def evaluate(self, params, split: str) -> dict | None:
    """Metrics of ``split`` (``None`` if a prediction is not finite)."""
    out = self.outputs(params, split)
    if not np.all(np.isfinite(out)):
      return None
    e = self.eval_sets[split]
    click = out[..., 0]
    labels = np.zeros(click.shape, bool)
    labels[:, 0] = True
    hr, ndcg = X.hit_ndcg(click, self.cfg.k)
    m = {
      "click_auc": X.auc(labels, click),
      "like_auc": X.auc(e["rating"] >= 4, out[:, 0, 1]),
      "rmse": X.rmse(self.mean_rating + out[:, 0, 2].astype(np.float64), e["rating"]),
      "hr": hr,
      "ndcg": ndcg,
    }
    m["skill"] = X.skill(m["click_auc"], m["like_auc"], m["rmse"], e["rmse_constant"]).tolist()
    return m


def multi_task_score(m: dict) -> float:
  return float(np.mean(m["skill"]))


def make_update(tx):
  """Jitted ``(params, state, grads, losses, lr, extra) -> (params, state)``:
  ``tx`` (ending in Adam's scaling) then a step of ``-lr``."""

  @jax.jit
  def update(params, state, grads, losses, lr, extra):
    upd, state = tx.update(grads, state, params, task_losses=losses, **extra)
    return jax.tree.map(lambda p, u: p - lr * u, params, upd), state

  return update


def make_row_update(opt):
  """Jitted update on one task's gradient ``grads[extra["task"]]`` (single-task, NMT stage 1)."""

  @jax.jit
  def update(params, state, grads, losses, lr, extra):
    del losses
    g = jax.tree.map(lambda x: x[extra["task"]], grads)
    upd, state = opt.update(g, state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, upd), state

  return update


def make_prefix_update(tx, k):
  """Jitted update on the first ``k`` task rows (NMT stages)."""

  @jax.jit
  def update(params, state, grads, losses, lr, extra):
    g = jax.tree.map(lambda x: x[:k], grads)
    upd, state = tx.update(g, state, params, task_losses=losses[:k], **extra)
    return jax.tree.map(lambda p, u: p - lr * u, params, upd), state

  return update


def train_run(
  ctx: Context,
  update,
  params,
  state,
  *,
  seed: int,
  lr: float,
  score: Callable[[dict], float] = multi_task_score,
  extra=None,
  evaluate_test: bool = True,
  second_batch: bool = False,
) -> RunResult:
  """Mini-batch training with early stopping on ``score(validation metrics)``.

  With ``evaluate_test=False`` (tuning trials, early NMT stages) the test
  split is not read; :func:`evaluate_test_split` does it later for a
  selected run. ``second_batch``: pass the stacked gradients of a second,
  independent mini-batch (drawn with replacement from its own stream) as
  ``stacked_2``.
  """
  cfg = ctx.cfg
  extra = {} if extra is None else extra
  t0 = time.perf_counter()
  per_epoch = ctx.n_train // cfg.batch_size
  lr = jnp.float32(lr)

  def step(params, state, idx, idx2):
    loss, grads, c = ctx.grad(params, idx)
    step_extra = extra
    if second_batch:
      step_extra = {**extra, "stacked_2": ctx.grad(params, idx2)[1]}
    params, state = update(params, state, grads, loss, lr, step_extra)
    return params, state, loss, c

  loop = early_stopping.train(
    params,
    state,
    step,
    lambda p: ctx.evaluate(p, "val"),
    score,
    n=ctx.n_train,
    batch_size=cfg.batch_size,
    max_steps=max(1, int(round(cfg.max_epochs * per_epoch))),
    eval_every=max(1, per_epoch // cfg.evals_per_epoch),
    patience=cfg.patience,
    seed=seed,
  )
  res = RunResult(status=loop.status, steps=loop.steps, best_step=loop.best_step)
  if loop.losses:
    res.losses = np.asarray(jnp.stack(loop.losses))
    res.cos = np.asarray(jnp.stack(loop.diagnostics))
  if loop.status == "ok":
    res.val, res.score, res.params = loop.best_val, loop.best_score, loop.best_params
    if evaluate_test:
      evaluate_test_split(ctx, res)
  res.wall_s = time.perf_counter() - t0
  return res


def evaluate_test_split(ctx: Context, res: RunResult) -> RunResult:
  """The one look at the test split, at the selected checkpoint; drops the parameters."""
  res.test = ctx.evaluate(res.params, "test")
  if res.test is None:
    res.status = "diverged: non-finite test predictions"
  res.params = None
  return res


# --------------------------------------------------------------------------
# Runners: ``run(seed, params, lr, hparams, evaluate_test) -> RunResult``.
# --------------------------------------------------------------------------


class MethodRunner:
  """A library method on the whole model, Adam after it. ``tuned``: the
  hyperparameter names the runs vary (injected: one trace for every value)."""

  def __init__(self, ctx: Context, name: str, tuned=()):
    self.ctx, self.name, self.tuned = ctx, name, tuple(tuned)
    self.factory = M.factory_of(name)
    M.factory_kwargs(self.factory, ctx.T, 0)  # raises Skip with the reason
    self.uses_seed = "seed" in M.factory_kwargs(self.factory, ctx.T, 0)
    self.second_batch = name in M.SECOND_BATCH
    self._updates = {}

  def _tx(self, seed, hparams):
    method = M.make_injected(self.name, self.ctx.T, seed, hparams, self.tuned)
    return optax.chain(method, optax.scale_by_adam())

  def run(self, seed, params, lr, hparams=None, *, evaluate_test=True):
    hparams = dict(hparams or {})
    trace_seed = 0 if self.name in M.SEED_IN_STATE_ONLY or not self.uses_seed else seed
    key = (trace_seed,) if self.tuned else (trace_seed, tuple(sorted(hparams.items())))
    if key not in self._updates:
      self._updates[key] = make_update(self._tx(trace_seed, hparams))
    state = self._tx(seed, hparams).init(params)
    return train_run(
      self.ctx,
      self._updates[key],
      params,
      state,
      seed=seed,
      lr=lr,
      evaluate_test=evaluate_test,
      second_batch=self.second_batch,
    )


class SingleTaskRunner:
  """One model per task, trained on that task's loss alone (Adam), each
  early-stopped on its own task's validation score."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.opt = optax.scale_by_adam()
    self._update = make_row_update(self.opt)

  def run_task(self, seed, params, lr, task, *, evaluate_test=True):
    res = train_run(
      self.ctx,
      self._update,
      params,
      self.opt.init(params),
      seed=seed,
      lr=lr,
      score=lambda m, t=task: float(m["skill"][t]),
      extra={"task": jnp.int32(task)},
      evaluate_test=evaluate_test,
    )
    res.extra.update(task=task, lr=lr)
    res.cos = None
    return res

  @staticmethod
  def combine(runs: list[RunResult]) -> RunResult:
    """The per-task models as one entry: each metric from its task's model
    (click AUC, HR and NDCG from the click model)."""
    bad = [r for r in runs if r.status != "ok"]
    if bad:
      return dataclasses.replace(bad[0], status=f"{bad[0].status} (task {bad[0].extra['task']})")
    owner = {"click_auc": 0, "hr": 0, "ndcg": 0, "like_auc": 1, "rmse": 2}

    def pick(split):
      if any(getattr(r, split) is None for r in runs):
        return None
      m = {k: getattr(runs[t], split)[k] for k, t in owner.items()}
      m["skill"] = [getattr(runs[t], split)["skill"][t] for t in range(len(runs))]
      return m

    val = pick("val")
    return RunResult(
      status="ok",
      val=val,
      test=pick("test"),
      score=float(np.mean(val["skill"])),
      best_step=max(r.best_step for r in runs),
      steps=sum(r.steps for r in runs),
      wall_s=sum(r.wall_s for r in runs),
      extra={"steps_per_task": [r.steps for r in runs], "lr": [r.extra.get("lr") for r in runs]},
    )


class NMTRunner:
  """Priority stages, task order = priority (click > like > rating).

  Stage 1 trains the first task alone; stage ``k + 1`` trains task ``k``
  under ``l_j <= target_j`` for the tasks before it (``gradcraft_jax.nmt``).
  Each stage early-stops on the mean validation score of the tasks trained
  so far and starts from the previous stage's selected parameters with a
  fresh Adam state and fresh multipliers. The target of a task is its mean
  training loss over the last evaluation period before the selected
  checkpoint of its stage.
  """

  def __init__(self, ctx: Context):
    self.ctx = ctx
    cfg = ctx.cfg
    self.opt = optax.scale_by_adam()
    self.stage0 = make_row_update(self.opt)
    self.txs, self.updates = {}, {}
    for k in range(1, ctx.T):
      tx = optax.chain(
        gradcraft_jax.nmt([0.0] * k, lagrange_lr=cfg.lagrange_lr, lagrange_clip=cfg.lagrange_clip),
        self.opt,
      )
      self.txs[k] = tx
      self.updates[k] = make_prefix_update(tx, k + 1)

  def run(self, seed, params, lr, hparams=None, *, evaluate_test=True):
    ctx = self.ctx
    targets, stages = [], []
    for k in range(ctx.T):
      score = lambda m, k=k: float(np.mean(m["skill"][: k + 1]))
      if k == 0:
        update, state, extra = self.stage0, self.opt.init(params), {"task": jnp.int32(0)}
      else:
        update, state = self.updates[k], self.txs[k].init(params)
        extra = {"targets": jnp.asarray(targets, jnp.float32)}
      res = train_run(
        ctx,
        update,
        params,
        state,
        seed=seed + 100 * k,
        lr=lr,
        score=score,
        extra=extra,
        evaluate_test=False,
      )
      stages.append(res)
      if res.status != "ok":
        return dataclasses.replace(
          res, status=f"{res.status} (stage {k + 1})", extra={"targets": targets}
        )
      lo = max(0, res.best_step - self.eval_period)
      targets.append(float(np.mean(res.losses[lo : res.best_step, k])))
      params = res.params
    final = stages[-1]
    out = RunResult(
      status="ok",
      val=final.val,
      score=final.score,
      best_step=final.best_step,
      steps=sum(s.steps for s in stages),
      wall_s=sum(s.wall_s for s in stages),
      cos=np.concatenate([s.cos for s in stages if s.cos is not None]),
      params=final.params,
      extra={"targets": targets, "stage_steps": [s.steps for s in stages]},
    )
    if evaluate_test:
      evaluate_test_split(ctx, out)
    return out

  @property
  def eval_period(self):
    per_epoch = self.ctx.n_train // self.ctx.cfg.batch_size
    return max(1, per_epoch // self.ctx.cfg.evals_per_epoch)
