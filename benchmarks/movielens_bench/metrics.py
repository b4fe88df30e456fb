"""Metrics of the MovieLens benchmark (NumPy, float64).

* :func:`auc`: ROC AUC (rank-sum statistic, tied scores count 1/2);
* :func:`rmse`;
* :func:`hit_ndcg`: HR@k and NDCG@k of one held-out item ranked among
  sampled negatives (the leave-one-out protocol of He et al., "Neural
  Collaborative Filtering", WWW 2017): with the held-out item at rank ``r``
  (0-based) among the candidates, ``HR@k = 1[r < k]`` and ``NDCG@k =
  1[r < k] / log2(r + 2)``, averaged over held-out interactions. Tied scores
  are broken uniformly at random, in expectation: with ``g`` negatives
  scored above the held-out item and ``e`` equal to it, ``r`` is uniform on
  ``{g, ..., g + e}``;
* :func:`skill`: the mean over tasks of the improvement over a constant
  predictor (the model-selection score).
"""

from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
  """ROC AUC of 0/1 ``labels`` and ``scores`` (1-D); ``nan`` with one class only."""
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each value
  ranks = mean_rank[inverse.reshape(-1)]
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rmse(pred, target) -> float:
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  return float(np.sqrt(np.mean((pred - target) ** 2)))


def hit_ndcg(scores, k: int = 10) -> tuple[float, float]:
  """``(HR@k, NDCG@k)`` of ``scores (n, 1 + K)``: column 0 is the held-out
  item, columns ``1..K`` its sampled negatives (ties in expectation, see the
  module docstring)."""
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or s.shape[1] < 2:
    raise ValueError(f"scores must be (n, 1 + K) with K >= 1, got {s.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  pos, neg = s[:, :1], s[:, 1:]
  g = np.sum(neg > pos, axis=1)
  e = np.sum(neg == pos, axis=1)
  ranks = np.arange(s.shape[1])
  hit = (ranks < k).astype(np.float64)
  gain = hit / np.log2(ranks + 2.0)
  cum_hit = np.concatenate([[0.0], np.cumsum(hit)])
  cum_gain = np.concatenate([[0.0], np.cumsum(gain)])
  hr = (cum_hit[g + e + 1] - cum_hit[g]) / (e + 1)
  ndcg = (cum_gain[g + e + 1] - cum_gain[g]) / (e + 1)
  return float(hr.mean()), float(ndcg.mean())


def skill(click_auc: float, like_auc: float, rmse_value: float, rmse_constant: float) -> np.ndarray:
  """Per-task improvement over a constant predictor: ``(AUC - 0.5) / 0.5`` for
  the binary tasks, ``1 - RMSE / RMSE_constant`` for the rating (``RMSE_constant``:
  the RMSE of the training mean rating)."""
  return np.array(
    [
      (click_auc - 0.5) / 0.5,
      (like_auc - 0.5) / 0.5,
      1.0 - rmse_value / rmse_constant,
    ]
  )
