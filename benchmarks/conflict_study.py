"""Controlled-conflict study: when does gradient crafting help, and by how much?

Synthetic multi-task regression in the style of the MMoE paper (Ma et al.,
"Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, Sec. 3.2), with two knobs:

* **conflict**: the cosine ``rho`` between the tasks' ground-truth weight
  vectors, from aligned (1) through orthogonal (0) to opposed (-0.9). For
  ``T = 2`` it is the cosine between the two tasks. For ``T = 4, 8`` the
  tasks form two groups of ``T/2`` (a pairwise cosine of -0.9 is impossible
  for more than two vectors): group directions ``a, b`` with ``cos(a, b) =
  rho``, task ``t`` has ``w_t = sqrt(0.8) g(t) + sqrt(0.2) e_t`` (``e_t``
  orthonormal, orthogonal to ``a, b``), so tasks within a group have cosine
  0.8 and across groups ``0.8 rho``.
* **imbalance**: task ``t``'s targets are multiplied by ``sqrt(s_t)`` with
  ``s_t`` log-spaced from 1 to ``R`` in ``{1, 10, 100, 1000}``, so the loss
  scales differ by up to ``R``x (at ``rho = 0.5``).

Targets (MMoE paper): ``y_t = w_t.x + sum_{j=1..10} sin(alpha_j w_t.x +
beta_j) + noise``, ``x ~ N(0, I_16)``, ``alpha_j, beta_j ~ N(0, 1)`` shared by
the tasks, noise ``N(0, 0.01)``; 1024 training, 1024 validation and 4096 test
rows per problem and seed.

Model and training: a shared-bottom MLP (16 -> 64 -> 32, ReLU; one 32 -> 16 -> 1
tower per task), MSE per task, ``optax.chain(method, optax.adam(lr))``,
mini-batches of 128, 400 steps, validation every 25 steps; the checkpoint with
the lowest mean *scale-normalised* validation loss is kept. Every seed draws
its own problem (weight vectors, nonlinearity, data) and initialisation; the
seeds, the problems, the settings and the learning rates of one ``T`` are
trained together by one ``jit`` of a ``vmap`` (``lax.scan`` over the steps).

Equal tuning budget: every entry is trained at every learning rate of
``lrs`` (default 1e-2, 3e-2, 1e-1) and at up to ``trials`` (default 1: the
paper's setting) settings of its own hyperparameters (``tuning.HPARAMS``: the
paper's or the library's default first); per setting of the study, the combination with the
lowest validation loss over the seeds is kept, and the test split is read
once, at the kept checkpoints.

Entries: single-task models (one per task, same model, the task's loss
alone, learning rate chosen per task); every method of the library
(``gradcraft_jax.methods.__all__``); NMT with priority task 1 > ... > task
T-1 > task T: the first ``T-1`` tasks are held at 1.1x the training loss of
their single-task model (at its selected checkpoint), the last is optimised.

Metrics, per setting and seed: test loss relative to equal weighting (and to
the single-task models) = geometric mean over tasks of ``mse_t(method) /
mse_t(reference)`` (scale-free, so imbalance does not let one task dominate).
Against equal weighting, the paired comparison over seeds of its logarithm
(``stats.compare_to_reference``): mean, 95% interval, seeds won, and Holm's
decision over the entries of the setting; reported as ratios (< 1: better
than the reference).

Outputs in ``--out``: ``conflict_table.csv`` (every setting and method),
``conflict_table.md``, ``conflict_vs_cosine.png``,
``conflict_vs_imbalance.png``; and the measured cosines between the task
gradients of the shared bottom at every step of the equal-weighting runs
(the generator's knob is a weight-vector cosine, not a gradient cosine):
``conflict_cosines.csv``, ``conflict_cosines.md``, ``conflict_cosines.png``.

Run from the repository root::

    python benchmarks/conflict_study.py --out out/conflict           # full
    python benchmarks/conflict_study.py --quick --out /tmp/conflict  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_meta  # noqa: E402
import stats  # noqa: E402
import tuning  # noqa: E402
from census_bench import methods as M  # noqa: E402

import gradcraft_jax  # noqa: E402

RHOS = (1.0, 0.5, 0.0, -0.5, -0.9)
RATIOS = (1.0, 10.0, 100.0, 1000.0)
IMBALANCE_RHO = 0.5
TASKS = (2, 4, 8)
SINGLE, EW, NMT = "single_task", "mean", "nmt"


@dataclasses.dataclass
class Cfg:
  tasks: tuple = TASKS
  rhos: tuple = RHOS
  ratios: tuple = RATIOS
  seeds: int = 5
  dim: int = 16
  n_train: int = 1024
  n_val: int = 1024
  n_test: int = 4096
  batch: int = 128
  steps: int = 400
  eval_every: int = 25
  lrs: tuple = (1e-2, 3e-2, 1e-1)
  trials: int = 1
  hidden: tuple = (64, 32)
  tower: int = 16
  methods: tuple | None = None  # None: every library method


QUICK = dict(
  tasks=(2,),
  rhos=(1.0, -0.9),
  ratios=(1.0, 100.0),
  seeds=2,
  steps=60,
  eval_every=20,
  lrs=(3e-3, 1e-2),
)
QUICK_METHODS = ("mean", "mgda", "gradcraft")


# --------------------------------------------------------------------------
# Problems.
# --------------------------------------------------------------------------


def task_directions(T, rho, dim, rng):
  """Unit weight vectors ``(T, dim)`` with the cosine structure of the docstring."""
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  a, a_perp, rest = q[:, 0], q[:, 1], q[:, 2:]
  b = rho * a + math.sqrt(max(0.0, 1 - rho**2)) * a_perp
  if T == 2:
    return np.stack([a, b])
  groups = [a if t < T // 2 else b for t in range(T)]
  return np.stack([math.sqrt(0.8) * g + math.sqrt(0.2) * rest[:, t] for t, g in enumerate(groups)])


def make_problem(T, rho, ratio, seed, cfg: Cfg):
  """Train / val / test arrays of one problem; targets ``(n, T)``."""
  rng = np.random.default_rng((seed, T, int(1000 * rho) + 5000, int(ratio)))
  w = task_directions(T, rho, cfg.dim, rng)
  alpha, beta = rng.normal(size=10), rng.normal(size=10)
  scale = np.sqrt(np.logspace(0, np.log10(ratio), T))

  def split(n):
    x = rng.normal(size=(n, cfg.dim))
    z = x @ w.T  # (n, T)
    y = z + np.sin(z[..., None] * alpha + beta).sum(-1) + rng.normal(scale=0.1, size=z.shape)
    return x.astype(np.float32), (y * scale).astype(np.float32)

  return split(cfg.n_train), split(cfg.n_val), split(cfg.n_test), (scale**2).astype(np.float32)


# --------------------------------------------------------------------------
# Model and the vmapped training run.
# --------------------------------------------------------------------------


def init_params(key, T, cfg: Cfg):
  dims = (cfg.dim,) + tuple(cfg.hidden)
  keys = jax.random.split(key, len(dims) + 1)
  p = {"bottom": [], "towers": []}
  for k, (a, b) in zip(keys, zip(dims[:-1], dims[1:])):
    p["bottom"].append((jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)))
  k1, k2 = jax.random.split(keys[-1])
  h = dims[-1]
  p["towers"] = [
    (jax.random.normal(k1, (T, h, cfg.tower)) / np.sqrt(h), jnp.zeros((T, cfg.tower))),
    (jax.random.normal(k2, (T, cfg.tower, 1)) / np.sqrt(cfg.tower), jnp.zeros((T, 1))),
  ]
  return p


def predict(p, x):
  h = x
  for w, b in p["bottom"]:
    h = jax.nn.relu(h @ w + b)
  (w1, b1), (w2, b2) = p["towers"]
  h = jax.nn.relu(jnp.einsum("bh,thk->btk", h, w1) + b1)
  return jnp.einsum("btk,tko->bto", h, w2)[..., 0] + b2[:, 0]  # (B, T)


def task_mse(p, x, y):
  return jnp.mean((predict(p, x) - y) ** 2, axis=0)  # (T,)


def shared_mask(p):
  return {"bottom": jax.tree.map(lambda _: True, p["bottom"]), "towers": [(False, False)] * 2}


def shared_cosines(grads):
  """``(T, T)`` cosines between the task gradients of the shared bottom."""
  g = jnp.concatenate([a.reshape(a.shape[0], -1) for a in jax.tree.leaves(grads["bottom"])], 1)
  k = g @ g.T
  n = jnp.sqrt(jnp.clip(jnp.diagonal(k), 1e-30))
  return k / (n[:, None] * n[None, :])


def make_train(method_fn, T, cfg: Cfg, *, single=False, second_batch=False, cosines=False):
  """``train(key, data, scales, extra) -> (best_params, best_val (T,))``, jitted, vmapped.

  ``method_fn(extra)`` builds the method's transform (``extra`` holds per-run
  arrays such as NMT targets); it is chained with Adam at the run's learning
  rate ``extra["lr"]``. ``single``: single-task training on row
  ``extra["task"]`` of the stacked gradients (``method_fn`` is ignored).
  ``second_batch``: also pass the stacked gradients of a second, independent
  mini-batch as ``stacked_2`` (MoDo, SDMGrad).
  ``cosines``: also return the ``(steps, T, T)`` cosines between the task
  gradients of the shared bottom at every training step.
  """
  grad_fn = gradcraft_jax.per_task_value_and_grad(lambda p, b: task_mse(p, *b))

  def run(key, data, scales, extra):
    (xtr, ytr), (xva, yva) = data
    kp, kb = jax.random.split(key)
    params = init_params(kp, T, cfg)
    adam = optax.adam(extra["lr"])
    tx = adam if single else optax.chain(method_fn(extra), adam)
    state = tx.init(params)
    n = xtr.shape[0]

    def step(carry, k):
      params, state = carry
      idx = jax.random.choice(k, n, (cfg.batch,), replace=False)
      if single:  # the task's own gradient (the same as row ``task`` of the stacked ones)
        one = lambda p: task_mse(p, xtr[idx], ytr[idx])[extra["task"]]
        upd, state = tx.update(jax.grad(one)(params), state, params)
        return (optax.apply_updates(params, upd), state), None
      losses, grads = grad_fn(params, (xtr[idx], ytr[idx]))
      kw = dict(extra.get("kw", {}))
      if second_batch:
        idx2 = jax.random.choice(jax.random.fold_in(k, 1), n, (cfg.batch,), replace=False)
        kw["stacked_2"] = grad_fn(params, (xtr[idx2], ytr[idx2]))[1]
      upd, state = tx.update(grads, state, params, task_losses=losses, **kw)
      return (optax.apply_updates(params, upd), state), shared_cosines(grads) if cosines else None

    def period(carry, ks):
      params, state, best_p, best_v, best_tv = carry
      (params, state), cos = jax.lax.scan(step, (params, state), ks)
      val = task_mse(params, xva, yva)
      score = val[extra["task"]] if single else jnp.mean(val / scales)
      better = (score < best_v) & jnp.isfinite(score)
      best_p = jax.tree.map(lambda a, b: jnp.where(better, a, b), params, best_p)
      best_tv = jnp.where(better, val, best_tv)
      best_v = jnp.where(better, score, best_v)
      return (params, state, best_p, best_v, best_tv), cos

    n_eval = cfg.steps // cfg.eval_every
    keys = jax.random.split(kb, n_eval * cfg.eval_every).reshape(n_eval, cfg.eval_every)
    init = (params, state, params, jnp.inf, jnp.full((T,), jnp.inf))
    (_, _, best_p, _, best_tv), cos = jax.lax.scan(period, init, keys)
    if cosines:
      return best_p, best_tv, cos.reshape((-1, T, T))
    return best_p, best_tv

  return jax.jit(jax.vmap(run))


@jax.jit
@jax.vmap
def _eval(p, x, y):
  return task_mse(p, x, y)


# --------------------------------------------------------------------------
# The study.
# --------------------------------------------------------------------------


def settings_for(cfg: Cfg):
  """``[(axis, rho, ratio)]``: conflict axis at ratio 1, imbalance axis at IMBALANCE_RHO."""
  out = [("conflict", r, 1.0) for r in cfg.rhos]
  out += [("imbalance", IMBALANCE_RHO, q) for q in cfg.ratios]
  return out


def val_score(v, axis):
  """Selection score of scale-normalised validation MSEs: the mean of their
  logarithm over ``axis``; ``inf`` for a diverged run, which is never chosen."""
  score = np.log(np.maximum(v, 1e-30)).mean(axis=axis)
  return np.where(np.isfinite(score), score, np.inf)


def run_T(T, cfg: Cfg, methods, log):
  """Every entry for one task count, each tuned on validation under the same budget.

  Every entry (the single-task models, equal weighting and NMT included) is
  trained at every learning rate of ``cfg.lrs`` and, for a method with
  hyperparameters of its own, at each of its first ``cfg.trials`` settings
  (:mod:`tuning`); per setting of the study the combination with the best
  validation score over the seeds is kept, and only its checkpoints are
  evaluated on the test split. Returns ``(settings, test, val, notes,
  cosines)`` with ``test[name]`` of shape ``(settings, seeds, T)``.
  """
  settings = settings_for(cfg)
  # The imbalance axis at ratio 1 is the conflict axis at IMBALANCE_RHO: one problem.
  uniq = list(dict.fromkeys((rho, q) for _, rho, q in settings))
  back = np.array([uniq.index((rho, q)) for _, rho, q in settings])
  S, K, L = len(uniq), cfg.seeds, len(cfg.lrs)
  probs = [[make_problem(T, rho, q, s, cfg) for s in range(K)] for (rho, q) in uniq]

  def stack(f, reps=1):
    runs = [f(probs[i][s]) for i in range(S) for s in range(K)] * reps
    return jax.tree.map(lambda *a: np.stack(a), *runs)

  # Runs are ordered (learning rate, setting, seed); seed s has the same
  # initial parameters and batches for every method, setting and learning rate.
  data, scales = stack(lambda p: (p[0], p[1]), L), stack(lambda p: p[3], L)
  train_xy, test = stack(lambda p: p[0]), stack(lambda p: p[2])
  seed_keys = [jax.random.fold_in(jax.random.key(1000 + s), T) for s in range(K)]
  keys = jnp.stack(seed_keys * (S * L))
  lrs = jnp.repeat(jnp.asarray(cfg.lrs, jnp.float32), S * K)
  sc = np.asarray(scales[: S * K]).reshape(S, K, T)
  out, val_out, notes = {}, {}, {}
  cosines = None  # (settings, seeds, steps, T, T), from the selected equal-weighting runs

  def per_lr(tree, li):
    return jax.tree.map(lambda a: a[li * S * K : (li + 1) * S * K], tree)

  def keep(best, cand, upd):
    """``cand`` where ``upd`` (per setting), else ``best``; leaves ``(S * K, ...)``."""
    m = np.repeat(upd, K)
    return jax.tree.map(
      lambda a, b: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), cand, best
    )

  def tune(name, make, extra=None, **kw):
    """Train every (hyperparameters, learning rate) of ``name``; keep the best per setting."""
    best = None
    for h in tuning.settings(name, cfg.trials):
      fn = make_train(lambda e, h=h: make(e, h), T, cfg, **kw)
      res = fn(keys, data, scales, {"lr": lrs, **(extra or {})})
      for li, lr in enumerate(cfg.lrs):
        cand = per_lr(res, li)  # (best_params, best_val[, cosines])
        v = np.asarray(cand[1]).reshape(S, K, T) / sc
        score = val_score(v, axis=(1, 2))
        label = f"lr {lr:g}" + (f"; {tuning.describe(h)}" if h else "")
        if best is None:
          best = [score, cand, np.array([label] * S, object)]
          continue
        upd = score < best[0]
        best[0] = np.where(upd, score, best[0])
        best[1] = keep(best[1], cand, upd)
        best[2] = np.where(upd, label, best[2])
    bp, bv = best[1][:2]
    out[name] = np.asarray(_eval(bp, *test)).reshape(S, K, T)  # the one look at the test split
    val_out[name] = np.asarray(bv).reshape(S, K, T)
    notes[name] = list(best[2])
    return best[1]

  # Single-task models: every task of every run in one vmapped call (run-major,
  # task-minor); the learning rate is chosen per task and setting.
  t0 = time.perf_counter()
  rep = lambda tree: jax.tree.map(lambda a: np.repeat(np.asarray(a), T, axis=0), tree)
  tasks = jnp.asarray(np.tile(np.arange(T), S * K * L))
  fn = make_train(None, T, cfg, single=True)
  bp, bv = fn(
    jnp.repeat(keys, T, axis=0), rep(data), rep(scales), {"lr": jnp.repeat(lrs, T), "task": tasks}
  )
  diag = lambda a: np.asarray(a).reshape(L, S, K, T, T)[..., np.arange(T), np.arange(T)]
  v = diag(bv) / sc  # (L, S, K, T)
  choice = np.argmin(val_score(v, axis=2), axis=0)  # (S, T)
  # Row (l, s, k, t) of the runs holds task t's model of setting s, seed k at rate l.
  rows = (
    choice[:, None, :] * (S * K * T)
    + np.arange(S)[:, None, None] * (K * T)
    + np.arange(K)[None, :, None] * T
    + np.arange(T)[None, None, :]
  ).ravel()
  sel = jax.tree.map(lambda a: a[rows], bp)
  pick = lambda a: np.asarray(a).reshape(S, K, T, T)[..., np.arange(T), np.arange(T)]
  out[SINGLE] = pick(_eval(sel, *rep(test)))
  val_out[SINGLE] = pick(np.asarray(bv)[rows])
  train_single = pick(_eval(sel, *rep(train_xy))).reshape(S * K, T)
  notes[SINGLE] = ["lr " + "/".join(f"{cfg.lrs[c]:g}" for c in choice[i]) for i in range(S)]
  log(f"T={T}: single-task models {time.perf_counter() - t0:.1f} s")

  for name in methods:
    t0 = time.perf_counter()
    try:
      if name == NMT:
        targets = jnp.asarray(np.tile(1.1 * train_single[:, : T - 1], (L, 1)))
        make = lambda e, h: gradcraft_jax.nmt([0.0] * (T - 1), lagrange_lr=1.0, lagrange_clip=10.0)
        tune(name, make, {"kw": {"targets": targets}})
      elif name == EW:  # the reference; its runs also record the gradient cosines
        res = tune(name, lambda e, h: gradcraft_jax.mean(), cosines=True)
        cosines = np.asarray(res[2]).reshape((S, K) + res[2].shape[1:])
      else:
        M.make_method(name, T, 0)  # raises Skip / not applicable before any training
        make = lambda e, h, name=name: M.make_method(name, T, 0, h)
        tune(name, make, second_batch=name in M.SECOND_BATCH)
    except M.Skip as e:
      notes[name] = str(e)
    except Exception as e:  # noqa: BLE001 - reported, never dropped
      msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
      if "needs at least" in msg:  # Krum, trimmed mean at T = 2: not applicable
        notes[name] = "n/a: " + msg.split(":", 1)[-1].split("(")[0].strip()
      else:
        notes[name] = f"error: {type(e).__name__}: {msg}"
    log(f"T={T}: {name:<24} {time.perf_counter() - t0:.1f} s {notes.get(name, '')}")
  # Back to the study's settings (the shared problem appears on both axes).
  out = {k: v[back] for k, v in out.items()}
  val_out = {k: v[back] for k, v in val_out.items()}
  notes = {k: [v[i] for i in back] if isinstance(v, list) else v for k, v in notes.items()}
  cosines = None if cosines is None else cosines[back]
  return settings, out, val_out, notes, cosines


def relative(a, b):
  """Per setting: mean and std over seeds of mean_t log(a / b), as ratios."""
  lr = np.log(np.maximum(a, 1e-30) / np.maximum(b, 1e-30)).mean(-1)  # (S, K)
  lr = np.where(np.isfinite(lr), lr, np.nan)
  return np.exp(np.nanmean(lr, 1)), np.nanstd(lr, 1), np.sum(np.isfinite(lr), 1)


def seed_log_losses(test):
  """``(settings, seeds, T)`` test MSEs -> ``(settings, seeds)``: the mean over
  tasks of ``log mse`` (its paired difference between two methods is the log
  of the geometric mean over tasks of the per-task ratio)."""
  return np.log(np.maximum(test, 1e-30)).mean(-1)


def summarise(all_T, alpha=0.05):
  """One row per ``T``, setting and entry: the paired comparison with equal
  weighting over the seeds (test loss ratio, 95% interval, Holm decision
  over the entries of the setting) and the ratio to the single-task models."""
  rows = []
  for T, (settings, out, _, notes, _) in all_T.items():
    comps = {}
    if EW in out:
      logs = {m: seed_log_losses(v) for m, v in out.items()}
      for i in range(len(settings)):
        vals = {m: dict(enumerate(v[i])) for m, v in logs.items()}
        for c in stats.compare_to_reference(vals, EW, higher_is_better=False, alpha=alpha):
          comps[(c.method, i)] = c
    names = [SINGLE] + [m for m in out if m != SINGLE] + [m for m in notes if m not in out]
    for name in dict.fromkeys(names):
      note = notes.get(name, "")
      for i, (axis, rho, q) in enumerate(settings):
        row = dict(T=T, axis=axis, rho=rho, ratio=q, method=name)
        row["note"] = note[i] if isinstance(note, list) else note
        if name in out:
          st = relative(out[name][i : i + 1], out[SINGLE][i : i + 1])
          row.update(rel_single=float(st[0][0]), rel_single_logstd=float(st[1][0]))
          c = comps.get((name, i))
          if name == EW:
            row.update(rel_ew=1.0, n_seeds=int(st[2][0]), decision="reference")
          elif c is not None:
            row.update(
              rel_ew=math.exp(c.mean) if math.isfinite(c.mean) else math.nan,
              rel_ew_logstd=c.std,
              ci95_low=math.exp(c.ci95[0]),
              ci95_high=math.exp(c.ci95[1]),
              ci_holm_low=math.exp(c.ci_holm[0]),
              ci_holm_high=math.exp(c.ci_holm[1]),
              wins=c.wins,
              n_seeds=c.n,
              decision=c.decision,
              m=c.m,
            )
        rows.append(row)
  return rows


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def cosine_rows(all_T):
  """Per ``T`` and setting: the distribution of the pairwise cosines between
  the task gradients of the shared bottom over the equal-weighting runs
  (every training step, seed and task pair; for ``T > 2`` also the pairs
  within a group and across the two groups apart)."""
  rows = []
  for T, (settings, _, _, _, cos) in all_T.items():
    if cos is None:
      continue
    i, j = np.triu_indices(T, 1)
    group = np.arange(T) >= T // 2
    kinds = {"all": np.ones(len(i), bool)}
    if T > 2:
      kinds["within groups"] = group[i] == group[j]
      kinds["across groups"] = group[i] != group[j]
    for n, (axis, rho, q) in enumerate(settings):
      pairs = cos[n][..., i, j]  # (seeds, steps, pairs)
      for kind, sel in kinds.items():
        v = pairs[..., sel].ravel()
        row = dict(T=T, axis=axis, rho=rho, ratio=q, pairs=kind, n=int(v.size))
        row.update(
          {f"q{int(100 * p):02d}": float(x) for p, x in zip(QUANTILES, np.quantile(v, QUANTILES))}
        )
        row.update(mean=float(v.mean()), negative=float(np.mean(v < 0)))
        rows.append(row)
  return rows


COS_KEYS = ["axis", "T", "rho", "ratio", "pairs", "n", "q05", "q25", "q50", "q75", "q95"]
COS_KEYS += ["mean", "negative"]


def write_cosines(rows, out, meta):
  """``conflict_cosines.csv`` and a Markdown table of the medians and 5-95% ranges
  (both headed by ``meta``: command, date, commit, machine)."""
  with open(os.path.join(out, "conflict_cosines.csv"), "w") as f:
    f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()))
    f.write(",".join(COS_KEYS) + "\n")
    for r in rows:
      f.write(",".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in COS_KEYS))
      f.write("\n")
  lines = [
    "".join(f"- {k}: {v}\n" for k, v in meta.items()),
    "Cosines between the task gradients of the shared bottom, measured at every training "
    "step of the equal-weighting runs (all seeds and task pairs): median [5%, 95%] and the "
    "share of negative cosines. The generator's knob is the cosine between the tasks' "
    "weight vectors; this is what the methods see.\n",
    "| T | setting | pairs | median [5%, 95%] | negative |",
    "|---:|---|---|---|---:|",
  ]
  for r in rows:
    setting = (
      f"cos {r['rho']:g}" if r["axis"] == "conflict" else f"{r['ratio']:g}x, cos {r['rho']:g}"
    )
    lines.append(
      f"| {r['T']} | {setting} | {r['pairs']} | {r['q50']:.2f} [{r['q05']:.2f}, {r['q95']:.2f}] "
      f"| {100 * r['negative']:.0f}% |"
    )
  with open(os.path.join(out, "conflict_cosines.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _panels(n, figsize):
  """``(pyplot, figure, axes)``: one row of ``n`` panels sharing the y axis."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, n, figsize=figsize, squeeze=False, sharey=True, layout="constrained")
  return plt, fig, axes


def plot_cosines(rows, path):
  """One panel per ``T``: the cosine distribution of each setting (boxes: 25-75%,
  whiskers 5-95%), against the generator's weight-vector cosine."""
  Ts = sorted({r["T"] for r in rows})
  plt, fig, axes = _panels(len(Ts), (max(4.4 * len(Ts), 6.5), 3.8))
  for ax, T in zip(axes[0], Ts):
    sub = [r for r in rows if r["T"] == T and r["pairs"] == ("across groups" if T > 2 else "all")]
    stats, labels = [], []
    for r in sub:
      stats.append(dict(med=r["q50"], q1=r["q25"], q3=r["q75"], whislo=r["q05"], whishi=r["q95"]))
      labels.append(f"{r['rho']:g}" if r["axis"] == "conflict" else f"{r['ratio']:g}x")
    ax.bxp(
      stats,
      showfliers=False,
      patch_artist=True,
      boxprops=dict(facecolor="#cfe0f3"),
      medianprops=dict(color="k"),
    )
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    n_conf = sum(r["axis"] == "conflict" for r in sub)
    ax.axvline(n_conf + 0.5, color="0.6", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    pairs = "pairs across the two groups" if T > 2 else "the two tasks"
    ax.set_title(f"T = {T} ({pairs})", fontsize=9)
    ax.set_xlabel("weight-vector cosine | loss-scale ratio (cos 0.5)", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
  axes[0][0].set_ylabel("gradient cosine, shared bottom")
  fig.suptitle(
    "Measured task-gradient cosines during equal-weighting training "
    "(box 25-75%, whiskers 5-95%, every step and seed)",
    fontsize=9,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


CSV_KEYS = ["axis", "T", "rho", "ratio", "method", "rel_ew", "ci95_low", "ci95_high"]
CSV_KEYS += ["ci_holm_low", "ci_holm_high", "decision", "wins", "n_seeds", "m", "rel_ew_logstd"]
CSV_KEYS += ["rel_single", "rel_single_logstd", "note"]
FLOAT_KEYS = ("rel_ew", "ci95_low", "ci95_high", "ci_holm_low", "ci_holm_high", "rel_ew_logstd")
FLOAT_KEYS += ("rel_single", "rel_single_logstd")


def write_csv(rows, path, meta):
  with open(path, "w") as f:
    f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()))
    f.write(",".join(CSV_KEYS) + "\n")
    for r in rows:
      vals = []
      for k in CSV_KEYS:
        v = r.get(k, "")
        if isinstance(v, float):
          v = "" if not np.isfinite(v) else f"{v:.6g}"
        elif k == "note":
          v = '"' + str(v).replace('"', "'") + '"'
        vals.append(str(v))
      f.write(",".join(vals) + "\n")


def _cell(r):
  if r.get("decision") == "reference":
    return "1 (reference)"
  v = r.get("rel_ew", np.nan)
  if not np.isfinite(v):
    return "-"
  s = f"{v:.3f}"
  s = {"better": f"**{s}**", "worse": f"_{s}_"}.get(r.get("decision"), s)
  lo, hi = r.get("ci95_low", np.nan), r.get("ci95_high", np.nan)
  if np.isfinite(lo) and np.isfinite(hi):
    s += f" [{lo:.2f}, {hi:.2f}]"
  return s + f" {r.get('wins', 0)}/{r.get('n_seeds', 0)}"


def budget_line(cfg):
  return (
    f"Tuning budget, the same for every entry (equal weighting, the single-task models and "
    f"NMT included): learning rates {', '.join(f'{x:g}' for x in cfg.lrs)} x up to "
    f"{cfg.trials} setting(s) of the method's own hyperparameters (`benchmarks/tuning.py`, "
    f"the paper's or the library's default first), chosen per setting of the study on the "
    f"validation loss over the {cfg.seeds} seeds; the single-task models choose a learning "
    f"rate per task. Only the chosen runs' checkpoints are evaluated on the test split. The "
    f"choices are in the `note` column of `conflict_table.csv`."
  )


def write_md(rows, path, cfg, wall, meta):
  lines = [
    "".join(f"- {k}: {v}\n" for k, v in meta.items() if k != "budget"),
    f"{meta.get('budget', budget_line(cfg))}\n",
    f"Each cell: test loss relative to equal weighting (geometric mean over tasks of the "
    f"per-task test MSE ratio, geometric mean over {cfg.seeds} seeds; < 1: better than equal "
    f"weighting), its paired 95% interval over the seeds (per comparison), and the seeds "
    f"won. **Bold**: better, _italic_: worse than equal weighting by Holm's procedure at "
    f"family-wise level 0.05 over the entries of that setting (the column); unmarked: a tie. "
    f"Single-task models are the row `single_task`. Wall time {wall:.0f} s.\n",
  ]
  lines += summary_lines(rows)
  for axis, col, fmt in (("conflict", "rho", "cos {:g}"), ("imbalance", "ratio", "{:g}x")):
    for T in sorted({r["T"] for r in rows}):
      sub = [r for r in rows if r["axis"] == axis and r["T"] == T]
      vals = sorted({r[col] for r in sub}, reverse=(axis == "conflict"))
      head = f"**{axis}, T = {T}**" + (
        " (loss-scale ratio 1x)" if axis == "conflict" else f" (cos {IMBALANCE_RHO:g})"
      )
      lines += [head, "", "| method | " + " | ".join(fmt.format(v) for v in vals) + " |"]
      lines.append("|---|" + "---:|" * len(vals))
      for name in dict.fromkeys(r["method"] for r in sub):
        cells = []
        for v in vals:
          r = next(x for x in sub if x["method"] == name and x[col] == v)
          cells.append(_cell(r) if "rel_ew" in r else str(r.get("note", "-"))[:40])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
      lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def summary_lines(rows):
  """Markdown: every entry sorted by its geometric mean ratio to equal
  weighting over the distinct problems (the imbalance axis at 1x repeats the
  conflict axis at IMBALANCE_RHO and is counted once), with its Holm decisions."""
  distinct = [r for r in rows if not (r["axis"] == "imbalance" and r["ratio"] == 1.0)]
  stats_ = []
  for name in dict.fromkeys(r["method"] for r in distinct):
    if name == EW:
      continue
    sub = [r for r in distinct if r["method"] == name and np.isfinite(r.get("rel_ew", np.nan))]
    if not sub:
      continue
    geo = math.exp(float(np.mean([math.log(r["rel_ew"]) for r in sub])))
    better = sum(r.get("decision") == "better" for r in sub)
    worse = sum(r.get("decision") == "worse" for r in sub)
    lo, hi = min(r["rel_ew"] for r in sub), max(r["rel_ew"] for r in sub)
    stats_.append((geo, name, len(sub), better, worse, lo, hi))
  out = [
    "**Summary**: each entry's geometric mean ratio to equal weighting over the distinct "
    "problems it ran on (conflict and imbalance axes, every T), its range, and in how many "
    "of them Holm's procedure finds it better or worse; sorted by the mean.",
    "",
    "| method | problems | mean ratio | range | better | worse |",
    "|---|---:|---:|---|---:|---:|",
  ]
  for geo, name, n, better, worse, lo, hi in sorted(stats_):
    out.append(f"| {name} | {n} | {geo:.3f} | {lo:.3f}-{hi:.3f} | {better} | {worse} |")
  return out + [""]


def _mean_effect(rows, name):
  v = [
    math.log(r["rel_ew"])
    for r in rows
    if r["method"] == name and np.isfinite(r.get("rel_ew", np.nan))
  ]
  return float(np.mean(v)) if v else math.inf


def plot_axis(rows, axis, path, caption, n_best=4):
  """One panel per ``T``: test loss relative to equal weighting against the
  setting, on a linear scale around 1; GradCraft, the single-task models and
  the ``n_best`` entries with the lowest mean effect over the panels are
  drawn with their paired 95% intervals, in the legend's order of effect;
  every other method is a grey line; values beyond the axis are marked at
  its edge with their value."""
  col = "rho" if axis == "conflict" else "ratio"
  Ts = sorted({r["T"] for r in rows})
  sub_all = [r for r in rows if r["axis"] == axis and np.isfinite(r.get("rel_ew", np.nan))]
  names = list(dict.fromkeys(r["method"] for r in sub_all if r["method"] != EW))
  ranked = sorted(names, key=lambda m: _mean_effect(sub_all, m))
  shown = [m for m in ranked if m not in ("gradcraft", SINGLE)][:n_best]
  shown = sorted(
    set(shown) | {"gradcraft", SINGLE} & set(names), key=lambda m: _mean_effect(sub_all, m)
  )
  hl = [r for r in sub_all if r["method"] in shown]
  lo = min([r["rel_ew"] for r in hl] + [1.0])
  hi = max([r["rel_ew"] for r in hl] + [1.0])
  ylo, yhi = max(0.0, min(lo, 0.8) - 0.05), min(max(hi, 1.2) + 0.05, 1.6)
  plt, fig, axes = _panels(len(Ts), (max(4.6 * len(Ts), 9.5), 4.8))
  palette = plt.cm.tab10(np.linspace(0, 1, 10))
  colors = {m: palette[i % 10] for i, m in enumerate(shown)}
  for ax, T in zip(axes[0], Ts):
    sub = [r for r in sub_all if r["T"] == T]
    off = []
    for name in [m for m in names if m not in shown]:
      pts = sorted((r[col], r["rel_ew"]) for r in sub if r["method"] == name)
      if pts:
        x, y = zip(*pts)
        ax.plot(x, np.clip(y, ylo, yhi), color="0.8", lw=0.7, zorder=1)
    for k, name in enumerate(shown):
      pts = sorted(
        (
          r[col],
          r["rel_ew"],
          r.get("ci95_low", np.nan),
          r.get("ci95_high", np.nan),
          r.get("decision"),
        )
        for r in sub
        if r["method"] == name
      )
      if not pts:
        continue
      x, y, l, h, _ = (np.array(v) for v in zip(*pts))
      jitter = 1.0 + 0.012 * (k - len(shown) / 2) if axis == "imbalance" else 0.0
      xj = x * jitter if axis == "imbalance" else x + 0.012 * (k - len(shown) / 2)
      yc = np.clip(y, ylo, yhi)
      err = [
        np.clip(yc - np.nan_to_num(l, nan=y), 0, None),
        np.clip(np.nan_to_num(h, nan=y) - yc, 0, None),
      ]
      ax.errorbar(
        xj,
        yc,
        yerr=err,
        marker="o",
        ms=4,
        capsize=2,
        color=colors[name],
        lw=2.4 if name == "gradcraft" else 1.4,
        label=name,
        zorder=3,
      )
      for xi, yi in zip(xj, y):
        if yi > yhi or yi < ylo:
          off.append(f"{name} {yi:.2f}")
          ax.plot(
            [xi],
            [yhi if yi > yhi else ylo],
            marker="^" if yi > yhi else "v",
            color=colors[name],
            ms=8,
            zorder=4,
          )
    ax.axhline(1.0, color="k", lw=1.0, ls="--")
    ax.set_ylim(ylo, yhi)
    ax.set_title(f"T = {T}", fontsize=10)
    ax.grid(alpha=0.3)
    if off:
      ax.text(
        0.02, 0.98, "off scale: " + ", ".join(off[:4]), transform=ax.transAxes, fontsize=6, va="top"
      )
    if axis == "conflict":
      ax.set_xlabel("cosine between task weight vectors")
      ax.invert_xaxis()
    else:
      ax.set_xscale("log")
      ax.set_xlabel(f"loss-scale ratio between tasks (cos {IMBALANCE_RHO:g})")
  axes[0][0].set_ylabel("test loss / equal weighting's\n(geometric mean over tasks; < 1 better)")
  handles, labels = axes[0][-1].get_legend_handles_labels()
  from matplotlib.lines import Line2D

  handles += [Line2D([], [], color="0.8", lw=0.7), Line2D([], [], color="k", ls="--")]
  labels += ["other methods", "equal weighting"]
  fig.legend(
    handles,
    labels,
    loc="outside right center",
    fontsize=8,
    title="by mean effect",
    title_fontsize=8,
  )
  title = "conflict" if axis == "conflict" else "loss-scale imbalance"
  extra = (
    "; T > 2: two groups of tasks, the cosine is between the groups' directions"
    if axis == "conflict"
    else ""
  )
  fig.suptitle(
    f"Synthetic MMoE-style tasks, every entry tuned under the same budget: test loss relative "
    f"to equal weighting vs {title}\n(mean over seeds; bars: paired 95% intervals{extra})",
    fontsize=9,
  )
  fig.text(0.005, 0.005, textwrap.fill(caption, 190), fontsize=6, color="0.3", va="bottom")
  fig.get_layout_engine().set(h_pad=0.25)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def read_csv(path):
  """The rows and metadata of a ``conflict_table.csv`` (to redraw table and figures)."""
  import csv

  meta, lines = {}, []
  with open(path) as f:
    for ln in f:
      if ln.startswith("# "):
        k, _, v = ln[2:].partition(": ")
        meta[k] = v.rstrip("\n")
      else:
        lines.append(ln)
  rows = []
  for r in csv.DictReader(lines):
    row = {"axis": r["axis"], "T": int(r["T"]), "rho": float(r["rho"])}
    row.update(ratio=float(r["ratio"]), method=r["method"], note=r["note"])
    if r["rel_ew"]:
      for k in FLOAT_KEYS:
        row[k] = float(r[k]) if r[k] else np.nan
      for k in ("wins", "n_seeds", "m"):
        if r[k]:
          row[k] = int(r[k])
      row["decision"] = r["decision"]
    rows.append(row)
  return rows, meta


def caption_of(meta):
  keys = ("machine", "date", "commit", "command")
  return " · ".join(f"{k}: {meta[k]}" for k in keys if k in meta)


def write_outputs(rows, out, cfg, wall, meta):
  write_csv(rows, os.path.join(out, "conflict_table.csv"), meta)
  write_md(rows, os.path.join(out, "conflict_table.md"), cfg, wall, meta)
  cap = caption_of(meta)
  plot_axis(rows, "conflict", os.path.join(out, "conflict_vs_cosine.png"), cap)
  plot_axis(rows, "imbalance", os.path.join(out, "conflict_vs_imbalance.png"), cap)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="out/conflict")
  ap.add_argument(
    "--redraw",
    type=float,
    default=None,
    metavar="WALL_S",
    help="redraw table and figures from --out/conflict_table.csv (no training)",
  )
  ap.add_argument(
    "--quick", action="store_true", help="smoke run: T = 2, 2 seeds, 60 steps, 3 methods and NMT"
  )
  ap.add_argument("--seeds", type=int, default=None, help=f"seeds (default {Cfg.seeds})")
  ap.add_argument("--lrs", default=None, help=f"learning-rate grid (default {Cfg.lrs})")
  ap.add_argument(
    "--trials",
    type=int,
    default=None,
    help=f"settings of each method's own hyperparameters (default {Cfg.trials})",
  )
  ap.add_argument("--methods", default=None, help="comma-separated subset of the library methods")
  args = ap.parse_args(argv)
  cfg = Cfg()
  if args.quick:
    cfg = dataclasses.replace(cfg, **QUICK, methods=QUICK_METHODS)
  if args.seeds:
    cfg.seeds = args.seeds
  if args.lrs:
    cfg.lrs = tuple(float(x) for x in args.lrs.split(","))
  if args.trials:
    cfg.trials = args.trials
  if args.methods:
    cfg.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  if args.redraw is not None:
    csv_rows, meta = read_csv(os.path.join(args.out, "conflict_table.csv"))
    cfg.seeds = max(r.get("n_seeds", 0) for r in csv_rows)
    write_outputs(csv_rows, args.out, cfg, args.redraw, meta)
    return csv_rows
  names = list(cfg.methods or M.library_method_names())
  if EW not in names:
    names.insert(0, EW)
  names.append(NMT)
  os.makedirs(args.out, exist_ok=True)
  meta = run_meta.metadata("benchmarks/conflict_study.py", sys.argv[1:] if argv is None else argv)
  meta["budget"] = budget_line(cfg)
  t_start = time.perf_counter()
  print(f"conflict study: {dataclasses.asdict(cfg)}; methods {names}", flush=True)
  all_T = {}
  for T in cfg.tasks:
    all_T[T] = run_T(T, cfg, names, lambda s: print(s, flush=True))
  wall = time.perf_counter() - t_start
  rows = summarise(all_T)
  write_outputs(rows, args.out, cfg, wall, meta)
  cos_rows = cosine_rows(all_T)
  if cos_rows:
    write_cosines(cos_rows, args.out, meta)
    plot_cosines(cos_rows, os.path.join(args.out, "conflict_cosines.png"))
    print(open(os.path.join(args.out, "conflict_cosines.md")).read())
  print(open(os.path.join(args.out, "conflict_table.md")).read())
  print(f"wall time {wall:.1f} s", flush=True)
  return rows


if __name__ == "__main__":
  main()
