"""Ranking metrics of the controller's predictor (spec §3.6)."""

from __future__ import annotations

import numpy as np
import scipy.stats


def pairwise_accuracy(truth, predicted) -> float:
  """Fraction of pairs (i < j) with different true scores that the prediction orders the same way.

  Pairs tied in the truth are skipped; a tie in the prediction counts as wrong.
  """
  truth, predicted = np.asarray(truth, np.float64), np.asarray(predicted, np.float64)
  if truth.shape != predicted.shape or truth.ndim != 1:
    raise ValueError(f'truth and predicted must be 1-D of equal length, got {truth.shape} and '
                     f'{predicted.shape}')
  dt = np.sign(truth[:, None] - truth[None, :])
  dp = np.sign(predicted[:, None] - predicted[None, :])
  upper = np.triu(np.ones_like(dt, bool), 1) & (dt != 0)
  if not upper.any():
    return float('nan')
  return float(np.mean((dt == dp)[upper]))


def kendall_tau(truth, predicted) -> float:
  """Kendall's tau-b between true and predicted scores."""
  return float(scipy.stats.kendalltau(truth, predicted).statistic)


def reconstruction_accuracy(tokens, decoded) -> float:
  """Fraction of sequences decoded back exactly (``int[N, L]`` each)."""
  tokens, decoded = np.asarray(tokens), np.asarray(decoded)
  return float(np.mean(np.all(tokens == decoded, axis=-1)))
