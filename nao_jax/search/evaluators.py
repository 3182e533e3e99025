"""Evaluators: what turns architectures into scores for a search.

Every evaluator has the same small interface, so the NAO loop and the baselines do not care
whether a score comes from a table, from training a network, or from a weight-sharing supernet:

* ``space``: the search space of the architectures it accepts;
* ``higher_is_better``: orientation of its scores (accuracy: True; perplexity / NLL: False);
* ``score_name``: what the score is, for logs and ``results.json``;
* ``stationary``: True when an architecture's score never changes (tables, training from
  scratch), so a search may cache it and never pay twice; False for a supernet, whose scores move
  as its shared weights train (the loop then re-scores its pool every round);
* ``evaluate(archs) -> list[dict]``: one record per architecture with at least ``score``
  (a finite float) and optionally ``cost`` (seconds the evaluation stands for);
* ``start_round(pool_archs, round_index)``: called before a round's scoring (a supernet trains
  here; others do nothing).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from nao_jax.data.nb201 import Nb201Table
from nao_jax.spaces.base import SearchSpace
from nao_jax.spaces.nb201 import NB201_SPACE


class Evaluator(Protocol):
  space: SearchSpace
  higher_is_better: bool
  score_name: str
  stationary: bool

  def evaluate(self, archs: np.ndarray) -> list[dict]:
    ...

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    ...


class TabularEvaluator:
  """Looks scores up in a NAS-Bench-201 table (validation accuracy, %)."""

  space = NB201_SPACE
  higher_is_better = True
  score_name = 'valid_accuracy'
  stationary = True

  def __init__(self, table: Nb201Table):
    self.table = table
    self._rows = {arch.tobytes(): row for row, arch in enumerate(table.archs)}

  def evaluate(self, archs: Sequence[np.ndarray]) -> list[dict]:
    records = []
    for arch in archs:
      row = self._rows.get(np.asarray(arch, np.int32).tobytes())
      if row is None:
        raise ValueError(f'architecture {NB201_SPACE.format(arch)} is not in the table '
                         f'{self.table.path}')
      record = {'score': float(self.table.accuracy[row])}
      if self.table.train_seconds is not None:
        record['cost'] = float(self.table.train_seconds[row])
      records.append(record)
    return records

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    del pool_archs, round_index
