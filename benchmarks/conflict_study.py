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
tower per task), MSE per task, ``optax.chain(method, optax.adam(3e-3))``,
mini-batches of 128, 400 steps, validation every 25 steps; the checkpoint with
the lowest mean *scale-normalised* validation loss is kept, and the test split
is read once per run, at that checkpoint. Every seed draws its own problem
(weight vectors, nonlinearity, data) and initialisation; the seeds, the
problems and the settings of one ``T`` are trained together by one ``jit`` of
a ``vmap`` (``lax.scan`` over the steps).

Entries: single-task models (one per task, same model, the task's loss
alone); every method of the library (``gradcraft_jax.methods.__all__``, with
their defaults; GradCraft's ``tau, eps`` chosen on validation per setting
from ``{0.1, 0.5, 1} x {1e-8, 0.1}``); NMT with priority task 1 > ... > task
T-1 > task T: the first ``T-1`` tasks are held at 1.1x the training loss of
their single-task model (at its selected checkpoint), the last is optimised.

Metrics, per setting and seed: test loss relative to equal weighting (and to
the single-task models) = geometric mean over tasks of ``mse_t(method) /
mse_t(reference)`` (scale-free, so imbalance does not let one task dominate);
mean and standard deviation over seeds of its logarithm, reported as ratios
(< 1: better than the reference).

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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_meta  # noqa: E402
from census_bench import methods as M  # noqa: E402

import gradcraft_jax  # noqa: E402

RHOS = (1.0, 0.5, 0.0, -0.5, -0.9)
RATIOS = (1.0, 10.0, 100.0, 1000.0)
IMBALANCE_RHO = 0.5
TASKS = (2, 4, 8)
GC_GRID = [(tau, eps) for tau in (0.1, 0.5, 1.0) for eps in (1e-8, 0.1)]
HIGHLIGHT = ("gradcraft", "mgda", "pcgrad", "cagrad", "nash_mtl", "uncertainty_weighting", "nmt")
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
  lr: float = 3e-3
  hidden: tuple = (64, 32)
  tower: int = 16
  grid: tuple = tuple(GC_GRID)
  methods: tuple | None = None  # None: every library method


QUICK = dict(tasks=(2,), rhos=(1.0, -0.9), ratios=(1.0, 100.0), seeds=2, steps=60, eval_every=20)
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


def make_train(tx_fn, T, cfg: Cfg, *, single=False, second_batch=False, cosines=False):
  """``train(key, data, scales, extra) -> (best_params, best_val (T,))``, jitted, vmapped.

  ``tx_fn(extra)`` builds the transform (``extra`` holds per-run arrays such
  as NMT targets or GradCraft's ``tau``/``eps``). ``single``: single-task
  training on row ``extra["task"]`` of the stacked gradients.
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
    tx = tx_fn(extra)
    state = tx.init(params)
    n = xtr.shape[0]

    def step(carry, k):
      params, state = carry
      idx = jax.random.choice(k, n, (cfg.batch,), replace=False)
      losses, grads = grad_fn(params, (xtr[idx], ytr[idx]))
      kw = dict(extra.get("kw", {}))
      if second_batch:
        idx2 = jax.random.choice(jax.random.fold_in(k, 1), n, (cfg.batch,), replace=False)
        kw["stacked_2"] = grad_fn(params, (xtr[idx2], ytr[idx2]))[1]
      if single:
        grads = jax.tree.map(lambda g: g[extra["task"]], grads)
        upd, state = tx.update(grads, state, params)
      else:
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


def run_T(T, cfg: Cfg, methods, log):
  """Every entry for one task count; returns ``{name: (test (S, seeds, T))}``."""
  settings = settings_for(cfg)
  S, K = len(settings), cfg.seeds
  probs = [[make_problem(T, rho, q, s, cfg) for s in range(K)] for (_, rho, q) in settings]

  def stack(f):
    return jax.tree.map(
      lambda *a: np.stack(a), *[f(probs[i][s]) for i in range(S) for s in range(K)]
    )

  data = stack(lambda p: (p[0], p[1]))
  train_xy = stack(lambda p: p[0])
  test = stack(lambda p: p[2])
  scales = stack(lambda p: p[3])
  # Seed s has the same initial parameters and batches for every method and setting.
  keys = jnp.stack(
    [jax.random.fold_in(jax.random.key(1000 + s), T) for _ in range(S) for s in range(K)]
  )
  out, val_out, notes = {}, {}, {}
  cosines = None  # (S, seeds, steps, T, T), from the equal-weighting runs

  def finish(name, best_p, best_val):
    test_mse = np.asarray(_eval(best_p, *test))  # the one look at the test split
    out[name] = test_mse.reshape(S, K, T)
    val_out[name] = np.asarray(best_val).reshape(S, K, T)

  # Single-task models: every task of every run in one vmapped call (run-major, task-minor).
  t0 = time.perf_counter()
  adam = optax.adam(cfg.lr)
  rep = lambda tree: jax.tree.map(lambda a: np.repeat(np.asarray(a), T, axis=0), tree)
  tasks = np.tile(np.arange(T), S * K)
  fn = make_train(lambda e: adam, T, cfg, single=True)
  bp, bv = fn(jnp.repeat(keys, T, axis=0), rep(data), rep(scales), {"task": jnp.asarray(tasks)})
  pick = lambda a: np.asarray(a).reshape(S * K, T, T)[:, np.arange(T), np.arange(T)]
  out[SINGLE] = pick(_eval(bp, *rep(test))).reshape(S, K, T)
  val_out[SINGLE] = pick(bv).reshape(S, K, T)
  train_single = pick(_eval(bp, *rep(train_xy)))  # (S*K, T)
  log(f"T={T}: single-task models {time.perf_counter() - t0:.1f} s")

  for name in methods:
    t0 = time.perf_counter()
    try:
      if name == "gradcraft":
        inj = optax.inject_hyperparams(gradcraft_jax.gradcraft, static_args=("num_tasks",))

        def tx_fn(e):
          return optax.chain(inj(tau=e["tau"], eps=e["eps"], num_tasks=T), optax.adam(cfg.lr))

        fn = make_train(tx_fn, T, cfg)
        best = None
        for tau, eps in cfg.grid:
          e = {"tau": jnp.full((S * K,), tau), "eps": jnp.full((S * K,), eps)}
          bp, bv = fn(keys, data, scales, e)
          v = np.asarray(bv).reshape(S, K, T) / scales.reshape(S, K, T)
          score = np.log(v).mean(axis=(1, 2))  # per setting, over seeds and tasks
          if best is None:
            best = [score, bp, bv, np.full(S, tau), np.full(S, eps)]
          else:
            upd = score < best[0]
            best[0] = np.where(upd, score, best[0])
            m = np.repeat(upd, K)
            best[1] = jax.tree.map(
              lambda a, b: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), bp, best[1]
            )
            best[2] = jnp.where(m[:, None], bv, best[2])
            best[3] = np.where(upd, tau, best[3])
            best[4] = np.where(upd, eps, best[4])
        finish(name, best[1], best[2])
        notes[name] = [f"tau={a:g}, eps={b:g}" for a, b in zip(best[3], best[4])]
      elif name == NMT:
        targets = jnp.asarray(1.1 * train_single[:, : T - 1])

        def tx_fn(e):
          return optax.chain(
            gradcraft_jax.nmt([0.0] * (T - 1), lagrange_lr=1.0, lagrange_clip=10.0),
            optax.adam(cfg.lr),
          )

        fn = make_train(tx_fn, T, cfg)
        bp, bv = fn(keys, data, scales, {"kw": {"targets": targets}})
        finish(name, bp, bv)
      elif name == EW:  # the reference; its run also records the gradient cosines
        make = lambda e: optax.chain(gradcraft_jax.mean(), optax.adam(cfg.lr))
        bp, bv, cos = make_train(make, T, cfg, cosines=True)(keys, data, scales, {})
        finish(name, bp, bv)
        cosines = np.asarray(cos).reshape((S, K) + cos.shape[1:])
      else:
        make = lambda e, name=name: optax.chain(M.make_method(name, T, 0), optax.adam(cfg.lr))
        fn = make_train(make, T, cfg, second_batch=name in M.SECOND_BATCH)
        bp, bv = fn(keys, data, scales, {})
        finish(name, bp, bv)
    except M.Skip as e:
      notes[name] = str(e)
    except Exception as e:  # noqa: BLE001 - reported, never dropped
      msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
      if "needs at least" in msg:  # Krum, trimmed mean at T = 2: not applicable
        notes[name] = "n/a: " + msg.split(":", 1)[-1].split("(")[0].strip()
      else:
        notes[name] = f"error: {type(e).__name__}: {msg}"
    log(f"T={T}: {name:<24} {time.perf_counter() - t0:.1f} s {notes.get(name, '')}")
  return settings, out, val_out, notes, cosines


def relative(a, b):
  """Per setting: mean and std over seeds of mean_t log(a / b), as ratios."""
  lr = np.log(np.maximum(a, 1e-30) / np.maximum(b, 1e-30)).mean(-1)  # (S, K)
  lr = np.where(np.isfinite(lr), lr, np.nan)
  return np.exp(np.nanmean(lr, 1)), np.nanstd(lr, 1), np.sum(np.isfinite(lr), 1)


def summarise(all_T):
  rows = []
  for T, (settings, out, _, notes, _) in all_T.items():
    for name in [SINGLE] + [m for m in out if m != SINGLE] + [m for m in notes if m not in out]:
      if name not in out:
        for axis, rho, q in settings:
          rows.append(dict(T=T, axis=axis, rho=rho, ratio=q, method=name, note=notes[name]))
        continue
      ew = relative(out[name], out[EW]) if EW in out else (np.full(len(settings), np.nan),) * 3
      st = relative(out[name], out[SINGLE])
      for i, (axis, rho, q) in enumerate(settings):
        note = notes.get(name, "")
        rows.append(
          dict(
            T=T,
            axis=axis,
            rho=rho,
            ratio=q,
            method=name,
            rel_ew=float(ew[0][i]),
            rel_ew_logstd=float(ew[1][i]),
            rel_single=float(st[0][i]),
            rel_single_logstd=float(st[1][i]),
            n_seeds=int(st[2][i]),
            note=note[i] if isinstance(note, list) else note,
          )
        )
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


def write_csv(rows, path):
  keys = ["axis", "T", "rho", "ratio", "method", "rel_ew", "rel_ew_logstd", "rel_single"]
  keys += ["rel_single_logstd", "n_seeds", "note"]
  with open(path, "w") as f:
    f.write(",".join(keys) + "\n")
    for r in rows:
      vals = []
      for k in keys:
        v = r.get(k, "")
        if isinstance(v, float):
          v = "" if not np.isfinite(v) else f"{v:.6g}"
        elif k == "note":
          v = '"' + str(v).replace('"', "'") + '"'
        vals.append(str(v))
      f.write(",".join(vals) + "\n")


def _cell(r, key):
  v = r.get(key, np.nan)
  if not np.isfinite(v):
    return "-"
  return f"{v:.3f}\u00a0×/÷\u00a0{math.exp(r[key + '_logstd']):.2f}"


def write_md(rows, path, cfg, wall):
  lines = [
    f"Test loss relative to equal weighting (geometric mean over tasks of the per-task "
    f"test MSE ratio; mean over {cfg.seeds} seeds, `×/÷` the geometric standard "
    f"deviation over seeds; < 1: better than equal weighting). Single-task models are the "
    f"row `single_task`. Wall time {wall:.0f} s.\n"
  ]
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
          cells.append(_cell(r, "rel_ew") if "rel_ew" in r else r.get("note", "-")[:40])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
      lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot_axis(rows, axis, path):
  col = "rho" if axis == "conflict" else "ratio"
  Ts = sorted({r["T"] for r in rows})
  plt, fig, axes = _panels(len(Ts), (max(4.6 * len(Ts), 9.5), 4.4))
  palette = plt.cm.tab10(np.linspace(0, 1, 10))
  styles = {m: palette[i] for i, m in enumerate((SINGLE,) + HIGHLIGHT)}
  for ax, T in zip(axes[0], Ts):
    sub = [r for r in rows if r["axis"] == axis and r["T"] == T and "rel_ew" in r]
    names = list(dict.fromkeys(r["method"] for r in sub))
    for name in names:
      pts = sorted((r[col], r["rel_ew"], r["rel_ew_logstd"]) for r in sub if r["method"] == name)
      x, y, s = (np.array(v) for v in zip(*pts))
      if name in styles:
        lo, hi = y - y * np.exp(-s), y * np.exp(s) - y
        ax.errorbar(
          x,
          y,
          yerr=[lo, hi],
          marker="o",
          ms=4,
          capsize=3,
          lw=1.6 if name != "gradcraft" else 2.4,
          color=styles[name],
          label=name,
          zorder=3,
        )
      elif name != EW:
        ax.plot(
          x, y, color="0.75", lw=0.8, zorder=1, label="other methods" if name == names[-1] else None
        )
    ax.axhline(1.0, color="k", lw=1.0, ls="--", label="equal weighting")
    ax.set_title(f"T = {T}", fontsize=10)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if axis == "conflict":
      ax.set_xlabel("cosine between task weight vectors")
      ax.invert_xaxis()
    else:
      ax.set_xscale("log")
      ax.set_xlabel(f"loss-scale ratio between tasks (cos {IMBALANCE_RHO:g})")
  if axis == "conflict":
    fig.supxlabel(
      "T > 2: two groups of tasks; the cosine is between the groups' directions", fontsize=8
    )
  from matplotlib.ticker import FormatStrFormatter, LogLocator

  for ax in axes[0]:
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.5, 3.0, 4.0, 7.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
  axes[0][0].set_ylabel("test loss / equal weighting's\n(geometric mean over tasks; < 1 better)")
  handles, labels = axes[0][-1].get_legend_handles_labels()
  seen = dict(zip(labels, handles))
  fig.legend(seen.values(), seen.keys(), loc="outside right center", fontsize=8)
  title = "conflict" if axis == "conflict" else "loss-scale imbalance"
  fig.suptitle(
    f"Synthetic MMoE-style tasks: test loss relative to equal weighting vs {title}\n"
    "(mean over seeds; error bars: geometric standard deviation over seeds)",
    fontsize=10,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def read_csv(path):
  """The rows of a ``conflict_table.csv`` (to redraw table and figures)."""
  import csv

  rows = []
  with open(path) as f:
    for r in csv.DictReader(f):
      row = {"axis": r["axis"], "T": int(r["T"]), "rho": float(r["rho"])}
      row.update(ratio=float(r["ratio"]), method=r["method"], note=r["note"])
      if r["rel_ew"]:
        for k in ("rel_ew", "rel_ew_logstd", "rel_single", "rel_single_logstd"):
          row[k] = float(r[k]) if r[k] else np.nan
        row["n_seeds"] = int(r["n_seeds"])
      rows.append(row)
  return rows


def write_outputs(rows, out, cfg, wall):
  write_csv(rows, os.path.join(out, "conflict_table.csv"))
  write_md(rows, os.path.join(out, "conflict_table.md"), cfg, wall)
  plot_axis(rows, "conflict", os.path.join(out, "conflict_vs_cosine.png"))
  plot_axis(rows, "imbalance", os.path.join(out, "conflict_vs_imbalance.png"))


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
  ap.add_argument("--seeds", type=int, default=None)
  ap.add_argument("--methods", default=None, help="comma-separated subset of the library methods")
  args = ap.parse_args(argv)
  cfg = Cfg()
  if args.quick:
    cfg = dataclasses.replace(cfg, **QUICK, methods=QUICK_METHODS)
  if args.seeds:
    cfg.seeds = args.seeds
  if args.methods:
    cfg.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  if args.redraw is not None:
    csv_rows = read_csv(os.path.join(args.out, "conflict_table.csv"))
    cfg.seeds = max(r.get("n_seeds", 0) for r in csv_rows)
    write_outputs(csv_rows, args.out, cfg, args.redraw)
    return csv_rows
  names = list(cfg.methods or M.library_method_names())
  if EW not in names:
    names.insert(0, EW)
  names.append(NMT)
  os.makedirs(args.out, exist_ok=True)
  meta = run_meta.metadata("benchmarks/conflict_study.py", sys.argv[1:] if argv is None else argv)
  t_start = time.perf_counter()
  print(f"conflict study: {dataclasses.asdict(cfg)}; methods {names}", flush=True)
  all_T = {}
  for T in cfg.tasks:
    all_T[T] = run_T(T, cfg, names, lambda s: print(s, flush=True))
  wall = time.perf_counter() - t_start
  rows = summarise(all_T)
  write_outputs(rows, args.out, cfg, wall)
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
