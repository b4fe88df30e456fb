"""The benchmarks' training loop: mini-batches in epochs, early stopping on a
validation score.

This is a plain module used by the benchmarks (``sys.path`` must include
``benchmarks/``); it is not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Loop:
  """What :func:`train` returns."""

  status: str  # "ok", or "diverged: ..." with the step
  steps: int  # steps taken
  best_step: int  # the step of the kept checkpoint (0: none)
  best_score: float
  best_val: Any  # ``evaluate(best_params)``
  best_params: Any
  losses: list  # the per-step losses, as returned by ``step``
  diagnostics: list  # the per-step diagnostics, as returned by ``step``


def train(
  params,
  state,
  step: Callable,
  evaluate: Callable,
  score: Callable,
  *,
  n: int,
  batch_size: int,
  max_steps: int,
  eval_every: int,
  patience: int,
  seed: int,
) -> Loop:
  """Trains until ``max_steps`` or until ``patience`` evaluations in a row
  do not improve the best score.

  Every epoch visits the ``n`` training rows in a new random order (seeded by
  ``seed``); ``step(params, state, idx, idx2) -> (params, state, loss,
  diagnostic)`` takes one mini-batch ``idx`` and a second, independent one
  ``idx2`` (drawn with replacement from a stream of its own, for the methods
  that read two batches; the others ignore it). Every ``eval_every`` steps,
  and at the last one, the recent losses are checked (a non-finite one ends
  the run as diverged), ``evaluate(params)`` gives the validation metrics
  (``None``: non-finite predictions, diverged) and ``score(metrics)`` the
  number to maximise; the best checkpoint is kept.
  """
  per_epoch = n // batch_size
  rng = np.random.default_rng((seed, 12345))
  rng2 = np.random.default_rng((seed, 54321))
  order = None
  best, best_params, best_step, best_val, bad = -np.inf, params, 0, None, 0
  losses, diags = [], []
  status, k = "ok", 0
  for k in range(1, max_steps + 1):
    i = (k - 1) % per_epoch
    if i == 0:
      order = rng.permutation(n).astype(np.int32)
    idx = order[i * batch_size : (i + 1) * batch_size]
    idx2 = rng2.integers(0, n, batch_size).astype(np.int32)
    params, state, loss, diag = step(params, state, idx, idx2)
    losses.append(loss)
    diags.append(diag)
    if k % eval_every == 0 or k == max_steps:
      recent = np.asarray(jnp.stack(losses[-eval_every:]))
      finite = np.all(np.isfinite(recent.reshape(len(recent), -1)), axis=1)
      if not np.all(finite):
        first_bad = k - len(recent) + int(np.argmax(~finite)) + 1
        status = f"diverged: non-finite training loss at step {first_bad}"
        break
      val = evaluate(params)
      if val is None:
        status = f"diverged: non-finite predictions at step {k}"
        break
      s = score(val)
      if s > best:
        best, best_params, best_step, best_val, bad = s, params, k, val, 0
      else:
        bad += 1
        if bad >= patience:
          break
  return Loop(status, k, best_step, float(best), best_val, best_params, losses, diags)
