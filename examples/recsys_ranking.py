"""Recommendation ranking: an MMoE with embedding tables, trained with GradCraft.

A click-through-style model (``benchmarks/recsys_models.py``): user and item
id embedding tables, a user history (multi-valued ids, mean-pooled), small
categorical and dense features, shared experts, and one gate and one tower
per task. Each training step is ``combined_value_and_grad(loss, gradcraft())``
(the lean step: the task losses and GradCraft's combined gradient, without
``T`` stacked copies of the parameters) followed by Adam. The data are
synthetic: Zipf-like ids (many duplicates in a batch) and labels from a fixed
random teacher. Per-task losses and ROC AUC on a held-out batch are printed.

Run: ``python examples/recsys_ranking.py`` (under a minute on a 2-core CPU);
larger: ``--vocab 500000 --tasks 8 --batch 1024 --model shared_bottom``.
"""

import argparse
import collections
import os
import sys
import time

import jax
import numpy as np
import optax

import gradcraft_jax as gj

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import recsys_models as rm  # noqa: E402  (benchmarks/recsys_models.py)


def main(
  steps=300, *, model="mmoe", vocab=10_000, tasks=4, batch_size=512, lr=3e-3, log_every=None
):
  """Train; returns the held-out task losses ``(first, last)``, each ``(T,)``."""
  cfg = rm.RecsysConfig(
    model=model, vocab=vocab, num_tasks=tasks, bottom=(128, 64), expert=(128, 64), tower=(32,)
  )
  graphdef, params = rm.init(cfg, seed=0)  # params: the model's nnx.State (a pytree)
  loss_fn = rm.make_loss_fn(graphdef)  # (params, batch) -> (T,) mean BCE per task
  batch_fn = rm.make_batch_fn(cfg)
  print(f"{model}: {rm.num_params(params):,} parameters, T = {tasks}, batch {batch_size}")

  # Which route forms each leaf's block of the Gram matrix (trace only).
  routes = gj.gram_coverage(loss_fn)(params, batch_fn(0, batch_size))
  print("Gram routes:", dict(collections.Counter(routes.values())))

  method = gj.gradcraft(tau=0.5, eps=0.1)
  lean = gj.combined_value_and_grad(loss_fn, method)  # losses, combined gradient, state
  adam = optax.adam(lr)
  state = (method.init(params), adam.init(params))

  @jax.jit
  def step(params, state, batch):
    method_state, adam_state = state
    losses, grads, method_state = lean(params, method_state, batch)
    updates, adam_state = adam.update(grads, adam_state, params)
    return optax.apply_updates(params, updates), (method_state, adam_state), losses

  test = batch_fn(10**6, 4096)  # held out: a key no training batch uses
  eval_losses = jax.jit(loss_fn)
  logits = jax.jit(rm.make_logits_fn(graphdef))

  def report(i, params, train):
    losses = np.asarray(eval_losses(params, test))
    aucs = rm.auc(test["labels"], logits(params, test))
    train = "   -  " if train is None else f"{np.mean(train):.4f}"
    print(
      f"step {i:4d}  train loss {train}  test loss "
      f"{np.array2string(losses, precision=3)}  AUC {np.array2string(aucs, precision=3)}"
    )
    return losses

  first = report(0, params, None)
  log_every = log_every or max(1, steps // 5)
  t0, recent = time.perf_counter(), []
  for i in range(1, steps + 1):
    params, state, losses = step(params, state, batch_fn(i, batch_size))
    recent.append(losses)
    if i % log_every == 0 or i == steps:
      last = report(i, params, np.mean(recent, axis=0))
      recent = []
  print(f"{steps} steps in {time.perf_counter() - t0:.1f} s (compilation included)")
  return first, last


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mmoe", choices=rm.MODELS)
  parser.add_argument("--vocab", type=int, default=10_000, help="rows of the user and item tables")
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=3e-3)
  a = parser.parse_args()
  main(a.steps, model=a.model, vocab=a.vocab, tasks=a.tasks, batch_size=a.batch, lr=a.lr)
