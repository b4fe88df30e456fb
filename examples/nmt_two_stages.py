"""NMT in two priority stages on Census-Income (shared-bottom model).

High-priority task: ``income``; low-priority task: ``never_married``.

1. Stage 1 trains ``income`` alone and records its target: the mean training
   loss over the last epoch of the stage.
2. Stage 2 trains ``never_married`` subject to ``income loss <= target``
   with NMT (Cheng et al., AAAI 2025, arXiv:2412.12092).
3. Baseline: from the same stage-1 parameters, the same number of steps on
   the mean of the two task losses (equal weighting).

Prints the test AUC of both tasks after each. Run from the repository root::

    python examples/nmt_two_stages.py --quick   # 20k rows per file, ~10 s
    python examples/nmt_two_stages.py           # all rows
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import mtl_models  # noqa: E402  (benchmarks/mtl_models.py)

import gradcraft_jax  # noqa: E402
from gradcraft_jax.datasets import load_census_income  # noqa: E402

TASKS = (0, 1)  # columns of TASK_NAMES: income (high priority), never_married


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small, fast run")
  ap.add_argument(
    "--epochs", type=int, default=None, help="epochs per stage (default 3, 6 with --quick)"
  )
  ap.add_argument("--batch-size", type=int, default=None, help="default 1024, 256 with --quick")
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--lagrange-lr", type=float, default=1.0)
  ap.add_argument("--lagrange-clip", type=float, default=10.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  epochs = args.epochs or (6 if args.quick else 3)

  data = load_census_income(max_rows=20_000 if args.quick else None, seed=args.seed)
  train = {"cat": data.train.cat, "num": data.train.num, "labels": data.train.labels[:, TASKS]}
  test = {"cat": data.test.cat, "num": data.test.num, "labels": data.test.labels[:, TASKS]}
  names = [data.task_names[t] for t in TASKS]
  n = len(train["labels"])
  bs = args.batch_size or (256 if args.quick else 1024)
  steps_per_epoch = n // bs
  steps = epochs * steps_per_epoch
  print(
    f"train rows {n}, test rows {len(test['labels'])}, "
    f"{steps} steps per stage ({epochs} epochs of {steps_per_epoch})"
  )

  def batches(stage, step):
    # A new shuffle every epoch, the same one in every stage and method.
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng((args.seed, epoch)).permutation(n)
    idx = order[i * bs : (i + 1) * bs]
    return {k: v[idx] for k, v in train.items()}

  model = mtl_models.SharedBottom(
    data.cardinalities, data.num_numeric, len(TASKS), rngs=nnx.Rngs(args.seed)
  )
  graphdef, params0 = nnx.split(model)
  loss_fn = mtl_models.make_loss_fn(graphdef)
  predict = mtl_models.make_predict_fn(graphdef)

  def test_auc(params):
    logits = np.concatenate(
      [
        np.asarray(predict(params, test["cat"][i : i + 8192], test["num"][i : i + 8192]))
        for i in range(0, len(test["labels"]), 8192)
      ]
    )
    return mtl_models.auc(test["labels"], logits)

  optimizer = optax.adam(args.lr)
  t0 = time.perf_counter()
  res = gradcraft_jax.stages.train_prioritized(
    loss_fn,
    params0,
    batches,
    optimizer=optimizer,
    steps_per_stage=steps,
    lagrange_lr=args.lagrange_lr,
    lagrange_clip=args.lagrange_clip,
    target_window=steps_per_epoch,
  )
  t_nmt = time.perf_counter() - t0
  stage1 = res.history[0].params

  # Equal weighting from the same stage-1 start: gradient of the mean loss
  # (= the mean of the two task gradients).
  @jax.jit
  def mean_step(params, state, batch):
    (_, losses), g = jax.value_and_grad(
      lambda p: (jnp.mean(loss_fn(p, batch)), loss_fn(p, batch)), has_aux=True
    )(params)
    upd, state = optimizer.update(g, state, params)
    return optax.apply_updates(params, upd), state, losses

  p_mean, s_mean = stage1, optimizer.init(stage1)
  mean_losses = []
  for i in range(steps):
    p_mean, s_mean, l = mean_step(p_mean, s_mean, batches(1, i))
    mean_losses.append(l)
  mean_losses = np.asarray(jnp.stack(mean_losses))

  last = slice(-steps_per_epoch, None)
  h2 = res.history[1]
  print(f"\n{names[0]} target (stage-1 last-epoch mean train loss): {res.targets[0]:.4f}")
  print(
    f"last-epoch mean train loss of {names[0]} in stage 2: "
    f"NMT {h2.losses[last, 0].mean():.4f}, "
    f"equal weighting {mean_losses[last, 0].mean():.4f}; "
    f"final multiplier {h2.multipliers[-1, 0]:.3f}"
  )
  print(f"\n{'test AUC':<28}{names[0]:>10}{names[1]:>15}")
  for label, p in [
    ("after stage 1", stage1),
    ("after stage 2, NMT", res.params),
    ("after stage 2, equal weights", p_mean),
  ]:
    a = test_auc(p)
    print(f"{label:<28}{a[0]:>10.4f}{a[1]:>15.4f}")
  print(f"\n(both NMT stages: {t_nmt:.1f} s)")


if __name__ == "__main__":
  main()
