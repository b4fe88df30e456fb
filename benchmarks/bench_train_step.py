"""Full training steps: plain, stacked and lean, next to torchjd.

For each model and task count ``T``, one jitted float32 training step
(gradients + method + Adam + apply) per path:

* ``plain``: ``jax.grad`` of the summed losses + Adam (the reference, 1x);
* ``stacked``: ``per_task_value_and_grad`` + ``optax.chain(method, adam)``;
* ``lean``: ``combined_value_and_grad(loss, method)`` + Adam;

for mean, GradCraft, UPGrad, MGDA and NMT, with the time per step as a ratio
to the plain step (all variants of a (model, T) cell timed interleaved, one
call of each per round, median over rounds) and the compiled temporary
memory (``jit(...).lower(...).compile().memory_analysis()``). Next to them,
the same architecture in PyTorch (CPU, ``torch.set_num_threads(2)``), the
same method where torchjd has it: a plain step, torchjd's ``autojac``
(``backward`` of the losses + ``jac_to_grad`` with the aggregator) and
``autogram`` (``Engine.compute_gramian`` + weighting + weighted backward),
each with ``torch.optim.Adam``, ratio to the PyTorch plain step.

Models: ``mlp``, a deep MLP (6 tanh layers of 1024 x 1024 + a
1024 x T head, batch 256, MSE per task); ``census``, a Census-income-like
shared-bottom MLP (499 inputs, bottom 256-128 with ReLU, one 64-1 tower per
task, batch 1024, binary cross-entropy per task).

Usage::

    python benchmarks/bench_train_step.py [--quick] [--tasks 2 4 8 16]
        [--models mlp census] [--rounds 5] [--out docs/benchmarks/train_step.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradcraft_jax as gj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_meta  # noqa: E402

warnings.filterwarnings("ignore")

METHODS = ("mean", "gradcraft", "upgrad", "mgda", "nmt")


def jax_method(name, t):
  if name == "mean":
    return gj.mean()
  if name == "gradcraft":
    return gj.gradcraft(0.5, 0.1)
  if name == "upgrad":
    return gj.upgrad()
  if name == "mgda":
    return gj.mgda()
  if name == "nmt":
    return gj.nmt(targets=[0.5] * (t - 1), lagrange_lr=0.1, lagrange_clip=10.0)
  raise ValueError(name)


def torchjd_method(name):
  """(aggregator, weighting) of torchjd, or None where it has no such method."""
  import torchjd.aggregation as ta  # pylint: disable=import-outside-toplevel

  return {
    "mean": (ta.Mean(), ta.MeanWeighting()),
    "upgrad": (ta.UPGrad(), ta.UPGradWeighting()),
    "mgda": (ta.MGDA(), ta.MGDAWeighting()),
  }.get(name)


# ---------------------------------------------------------------- models


def model_config(name, t, quick):
  if name == "mlp":
    if quick:
      return dict(kind="mlp", d=64, depth=2, batch=16, t=t)
    return dict(kind="mlp", d=1024, depth=6, batch=256, t=t)
  if name == "census":
    if quick:
      return dict(kind="census", d_in=32, bottom=(16, 8), tower=8, batch=32, t=t)
    return dict(kind="census", d_in=499, bottom=(256, 128), tower=64, batch=1024, t=t)
  raise ValueError(name)


def init_numpy(cfg, rng):
  """Parameters and a batch as NumPy float32 arrays (shared by both libraries)."""
  f = np.float32
  t = cfg["t"]
  if cfg["kind"] == "mlp":
    d = cfg["d"]
    p = {
      "layers": [
        {"w": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(f), "b": np.zeros(d, f)}
        for _ in range(cfg["depth"])
      ],
      "head": (rng.normal(size=(d, t)) / np.sqrt(d)).astype(f),
    }
    x = rng.normal(size=(cfg["batch"], d)).astype(f)
    y = rng.normal(size=(cfg["batch"], t)).astype(f)
    return p, x, y
  sizes = (cfg["d_in"], *cfg["bottom"])
  p = {
    "bottom": [
      {"w": (rng.normal(size=(a, b)) * np.sqrt(2 / a)).astype(f), "b": np.zeros(b, f)}
      for a, b in zip(sizes[:-1], sizes[1:])
    ],
    # towers stacked on a leading task axis: (T, H, tower), (T, tower), (T, tower), (T,)
    "tw1": (rng.normal(size=(t, sizes[-1], cfg["tower"])) * np.sqrt(2 / sizes[-1])).astype(f),
    "tb1": np.zeros((t, cfg["tower"]), f),
    "tw2": (rng.normal(size=(t, cfg["tower"])) / np.sqrt(cfg["tower"])).astype(f),
    "tb2": np.zeros((t,), f),
  }
  x = (rng.random(size=(cfg["batch"], cfg["d_in"])) < 0.05).astype(f)
  y = (rng.random(size=(cfg["batch"], t)) < 0.3).astype(f)
  return p, x, y


def jax_loss(cfg):
  if cfg["kind"] == "mlp":

    def loss(p, x, y):
      h = x
      for layer in p["layers"]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
      return jnp.mean((h @ p["head"] - y) ** 2, axis=0)

    return loss

  def loss(p, x, y):
    h = x
    for layer in p["bottom"]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    z = jax.nn.relu(jnp.einsum("bh,thk->tbk", h, p["tw1"]) + p["tb1"][:, None, :])
    logits = jnp.einsum("tbk,tk->bt", z, p["tw2"]) + p["tb2"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y), axis=0)

  return loss


def jax_steps(cfg, params, methods):
  """name -> (jitted step, args) for every JAX variant of a cell."""
  loss = jax_loss(cfg)
  adam = optax.adam(1e-3)
  out = {}

  def plain(p, s, x, y):
    g = jax.grad(lambda p: jnp.sum(loss(p, x, y)))(p)
    upd, s = adam.update(g, s, p)
    return optax.apply_updates(p, upd), s

  out["plain"] = (jax.jit(plain), (params, adam.init(params)))
  per_task = gj.per_task_value_and_grad(loss)
  for name in methods:
    method = jax_method(name, cfg["t"])
    tx = optax.chain(method, adam)

    def stacked(p, s, x, y, tx=tx):
      losses, g = per_task(p, x, y)
      upd, s = tx.update(g, s, p, task_losses=losses)
      return optax.apply_updates(p, upd), s

    lean_fn = gj.combined_value_and_grad(loss, method)

    def lean(p, s, x, y, lean_fn=lean_fn):
      ms, adam_s = s
      _, g, ms = lean_fn(p, ms, x, y)
      upd, adam_s = adam.update(g, adam_s, p)
      return optax.apply_updates(p, upd), (ms, adam_s)

    out[f"stacked {name}"] = (jax.jit(stacked), (params, tx.init(params)))
    out[f"lean {name}"] = (jax.jit(lean), (params, (method.init(params), adam.init(params))))
    if name != "gradcraft":
      continue
    # GradCraft only: the routes this library's defaults replace (plain
    # batched pullback for the stacked gradients, per-task pullbacks for the
    # lean Gram matrix), and the stacked step's two parts timed apart.
    per_task_vmap = gj.per_task_value_and_grad(loss, gram="pullback")

    def stacked_vmap(p, s, x, y, tx=tx):
      losses, g = per_task_vmap(p, x, y)
      upd, s = tx.update(g, s, p, task_losses=losses)
      return optax.apply_updates(p, upd), s

    lean_pull = gj.combined_value_and_grad(loss, method, gram="pullback")

    def lean_pullback(p, s, x, y):
      ms, adam_s = s
      _, g, ms = lean_pull(p, ms, x, y)
      upd, adam_s = adam.update(g, adam_s, p)
      return optax.apply_updates(p, upd), (ms, adam_s)

    def grads_only(p, s, x, y):
      del s
      return per_task(p, x, y)

    out["stacked-vmap gradcraft"] = (jax.jit(stacked_vmap), (params, tx.init(params)))
    out["lean-pullback gradcraft"] = (
      jax.jit(lean_pullback),
      (params, (method.init(params), adam.init(params))),
    )
    out["part grads gradcraft"] = (jax.jit(grads_only), (params, None))
  return out


def update_part(cfg, params, x, y, name):
  """The stacked step's second part alone: method + Adam + apply on given
  stacked gradients (jitted, as a zero-argument call)."""
  loss = jax_loss(cfg)
  tx = optax.chain(jax_method(name, cfg["t"]), optax.adam(1e-3))
  losses, g = jax.jit(gj.per_task_value_and_grad(loss))(params, x, y)
  s = tx.init(params)

  def update(p, s, g, losses):
    upd, s = tx.update(g, s, p, task_losses=losses)
    return optax.apply_updates(p, upd), s

  fn = jax.jit(update).lower(params, s, g, losses).compile()
  return lambda: jax.block_until_ready(fn(params, s, g, losses))


# ---------------------------------------------------------------- torch


def torch_model(cfg, np_params):
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class MLP(nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleList()
      for layer in np_params["layers"]:
        lin = nn.Linear(*layer["w"].shape)
        with torch.no_grad():
          lin.weight.copy_(torch.from_numpy(layer["w"].T.copy()))
          lin.bias.copy_(torch.from_numpy(layer["b"]))
        self.layers.append(lin)
      self.head = nn.Linear(*np_params["head"].shape, bias=False)
      with torch.no_grad():
        self.head.weight.copy_(torch.from_numpy(np_params["head"].T.copy()))

    def forward(self, x, y):
      h = x
      for lin in self.layers:
        h = torch.tanh(lin(h))
      return ((self.head(h) - y) ** 2).mean(dim=0)

  class Census(nn.Module):
    def __init__(self):
      super().__init__()
      self.bottom = nn.ModuleList()
      for layer in np_params["bottom"]:
        lin = nn.Linear(*layer["w"].shape)
        with torch.no_grad():
          lin.weight.copy_(torch.from_numpy(layer["w"].T.copy()))
        self.bottom.append(lin)
      t, h, k = np_params["tw1"].shape
      self.towers = nn.ModuleList(
        nn.Sequential(nn.Linear(h, k), nn.ReLU(), nn.Linear(k, 1)) for _ in range(t)
      )

    def forward(self, x, y):
      h = x
      for lin in self.bottom:
        h = torch.relu(lin(h))
      logits = torch.cat([tower(h) for tower in self.towers], dim=1)
      bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
      return bce.mean(dim=0)

  return MLP() if cfg["kind"] == "mlp" else Census()


def torch_steps(cfg, np_params, x, y, methods):
  """name -> zero-argument step for the PyTorch variants of a cell."""
  import torch  # pylint: disable=import-outside-toplevel
  from torchjd.autogram import Engine  # pylint: disable=import-outside-toplevel
  from torchjd.autojac import backward, jac_to_grad  # pylint: disable=import-outside-toplevel

  tx, ty = torch.from_numpy(x), torch.from_numpy(y)
  out = {}

  def make(kind, agg=None, weighting=None):
    model = torch_model(cfg, np_params)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    engine = Engine(model, batch_dim=None) if kind == "autogram" else None

    def step():
      opt.zero_grad()
      losses = model(tx, ty)
      if kind == "plain":
        losses.sum().backward()
      elif kind == "autojac":
        backward(losses)
        jac_to_grad(params, agg)
      else:
        gram = engine.compute_gramian(losses)
        losses.backward(weighting(gram))
      opt.step()

    return step

  out["torch plain"] = make("plain")
  for name in methods:
    pair = torchjd_method(name)
    if pair is None:
      continue
    out[f"autojac {name}"] = make("autojac", agg=pair[0])
    out[f"autogram {name}"] = make("autogram", weighting=pair[1])
  return out


# ---------------------------------------------------------------- timing


def compile_with_memory(fn, args):
  """(compiled step, temporary MiB) from one compilation."""
  compiled = fn.lower(*args).compile()
  try:
    mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    mib = float("nan")
  return compiled, mib


def interleaved(calls, rounds):
  """Median seconds per call: one call of each per round, ``rounds`` rounds
  (after one warm-up round)."""
  for fn in calls.values():
    fn()
  times = {k: [] for k in calls}
  for _ in range(rounds):
    for k, fn in calls.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def run_cell(model, t, args):
  cfg = model_config(model, t, args.quick)
  rng = np.random.default_rng(t)
  np_params, x, y = init_numpy(cfg, rng)
  params = jax.tree_util.tree_map(jnp.asarray, np_params)
  jx, jy = jnp.asarray(x), jnp.asarray(y)
  variants = jax_steps(cfg, params, args.methods)
  calls, mem = {}, {}
  for name, (fn, (p, s)) in variants.items():
    fn, mem[name] = compile_with_memory(fn, (p, s, jx, jy))

    def call(fn=fn, p=p, s=s):
      jax.block_until_ready(fn(p, s, jx, jy))

    calls[name] = call
  if "gradcraft" in args.methods:
    calls["part update gradcraft"] = update_part(cfg, params, jx, jy, "gradcraft")
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    calls.update(torch_steps(cfg, np_params, x, y, args.methods))
  times = interleaved(calls, args.rounds)
  rows = []
  for name in args.methods:
    tj = times.get(f"autojac {name}")
    tg = times.get(f"autogram {name}")
    tp = times.get("torch plain")
    rows.append(
      dict(
        model=model,
        t=t,
        method=name,
        plain_ms=1e3 * times["plain"],
        stacked=times[f"stacked {name}"] / times["plain"],
        lean=times[f"lean {name}"] / times["plain"],
        mem_plain=mem["plain"],
        mem_stacked=mem[f"stacked {name}"],
        mem_lean=mem[f"lean {name}"],
        torch_plain_ms=None if tp is None else 1e3 * tp,
        autojac=None if tj is None else tj / tp,
        autogram=None if tg is None else tg / tp,
        stacked_vmap=_ratio(times, f"stacked-vmap {name}"),
        lean_pullback=_ratio(times, f"lean-pullback {name}"),
        parts=(
          (times[f"part grads {name}"] + times[f"part update {name}"]) / times["plain"]
          if f"part grads {name}" in times
          else None
        ),
        abs_ms={k: 1e3 * v for k, v in times.items()},
      )
    )
  return rows


def _ratio(times, key):
  return times[key] / times["plain"] if key in times else None


def fmt(v, spec="{:.1f}x"):
  return "n/a" if v is None else spec.format(v)


def gradcraft_table(rows):
  """The GradCraft rows: this library's defaults next to the routes they
  replace, and the stacked step against its two parts timed apart."""
  lines = [
    "| model | T | stacked | stacked, plain `vmap` pullback | grads + update timed apart "
    "| lean | lean, Gram from pullbacks |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["method"] != "gradcraft":
      continue
    lines.append(
      f"| {r['model']} | {r['t']} | {r['stacked']:.1f}x | {fmt(r['stacked_vmap'])} | "
      f"{fmt(r['parts'])} | {r['lean']:.1f}x | {fmt(r['lean_pullback'])} |"
    )
  return "\n".join(lines)


def table(rows):
  lines = [
    "| model | T | method | plain (ms) | stacked | lean | temp MiB plain / stacked / lean "
    "| torch plain (ms) | torchjd autojac | torchjd autogram |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['t']} | {r['method']} | {r['plain_ms']:.1f} | "
      f"{r['stacked']:.1f}x | {r['lean']:.1f}x | "
      f"{r['mem_plain']:.0f} / {r['mem_stacked']:.0f} / {r['mem_lean']:.0f} | "
      f"{fmt(r['torch_plain_ms'], '{:.1f}')} | {fmt(r['autojac'])} | {fmt(r['autogram'])} |"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  parser.add_argument("--tasks", type=int, nargs="+", default=None)
  parser.add_argument("--models", nargs="+", default=["mlp", "census"])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=None, help="write a Markdown page here")
  args = parser.parse_args(argv)
  if args.tasks is None:
    args.tasks = [2] if args.quick else [2, 4, 8, 16]
  if args.quick:
    args.rounds = min(args.rounds, 2)
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(2)

  rows = []
  for model in args.models:
    for t in args.tasks:
      cell = run_cell(model, t, args)
      rows.extend(cell)
      for r in cell:
        print(
          f"{model:7s} T={t:3d} {r['method']:10s} plain {r['plain_ms']:8.1f} ms "
          f"stacked {r['stacked']:5.1f}x lean {r['lean']:5.1f}x "
          f"mem {r['mem_stacked']:7.1f}/{r['mem_lean']:7.1f} MiB "
          f"autojac {fmt(r['autojac'])} autogram {fmt(r['autogram'])}",
          flush=True,
        )
  text = table(rows)
  print()
  print(text)
  print()
  print(gradcraft_table(rows))
  if args.out:
    cmd = "python " + " ".join(
      [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])
    )
    doc = [
      "# Training step: plain, stacked, lean, torchjd",
      "",
      f"Command: `{cmd}`  ",
      f"Date: {datetime.date.today().isoformat()}  ",
      f"Commit: {run_meta.commit()}  ",
      f"Machine: {run_meta.bench_machine(not args.no_torch)}",
      "",
      "One jitted float32 training step (gradients, method, Adam, apply) per "
      "path; `stacked` and `lean` are ratios of the median step time to the "
      "`plain` step (`jax.grad` of the summed losses + Adam) of the same "
      "cell, all variants of a cell timed interleaved (one call each per "
      "round, median over rounds, compilation excluded). Temporary memory: "
      "`jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes` "
      "(XLA:CPU). torchjd columns: the same architecture and method in "
      "PyTorch, ratio to the PyTorch plain step (`torch plain`), "
      "`torch.set_num_threads(2)`; `n/a` where torchjd has no such method "
      "(GradCraft, NMT). The machine is shared with other jobs, so absolute "
      "times are noisy and inflated; compare ratios within one cell.",
      "",
      text,
      "",
      "GradCraft: the defaults (stacked: dense weights' per-task gradients as one "
      "batched product in the stacked layout; lean: dense-layer Gram identity) "
      "next to the routes they replace (`per_task_value_and_grad(..., "
      'gram="pullback")`, `combined_value_and_grad(..., gram="pullback")`), and the '
      "stacked step against its parts timed apart (per-task gradients alone + "
      "method, Adam and apply alone), all as ratios to the plain step of the "
      "same cell:",
      "",
      gradcraft_table(rows),
      "",
    ]
    with open(args.out, "w") as f:
      f.write("\n".join(doc))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
