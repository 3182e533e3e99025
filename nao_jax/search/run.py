"""A search's run directory and its query budget.

``SearchRun`` owns the run directory of one search:

* ``config.json``: the full config; a rerun with an incompatible config is refused;
* ``history.jsonl``: every evaluation, durably appended (``history.History``);
* ``results.json``: the best architecture so far in the space's official string (``best_arch``),
  ``best_score``, ``queries``, ``rounds``, ``wall_s``, the seed and the config;
* ``best_so_far.png`` and TensorBoard scalars under ``tb/``.

Searchers ask for scores through ``SearchRun.query``. With a stationary evaluator every
architecture is evaluated at most once per run, ever: answers come from the history when it has
them, including after a restart, so rerunning a killed command replays the deterministic search
up to where it stopped without paying for any evaluation twice, and continues from there.
A query is one evaluated, previously unseen architecture (by canonical key).

Multi-process runs (``--distributed``) share one run directory: every process reads it (config,
history, results), so that all replay a resumed search the same way, and keeps the same history
in memory; only the primary process (``parallel.is_primary()``) writes the files above.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import logging
import numpy as np

from nao_jax import parallel
from nao_jax.search.evaluators import Evaluator
from nao_jax.checkpoint import write_json_atomic
from nao_jax.search.history import History
from nao_jax.progress import Progress, ScalarWriter, plot_best_so_far

# Config keys that may differ between the run that created a directory and a resumed one.
# A larger budget extends a run: every searcher here is budget-independent up to truncation.
RESUME_TOLERATED_KEYS = ('log_every', 'budget')


class BudgetExhausted(Exception):
  """Raised when a searcher asks for more new evaluations than the budget has left."""


class SearchRun:
  """Run directory, budget accounting and logging of one search."""

  def __init__(self, workdir: str, config: dict, evaluator: Evaluator, budget: int, seed: int):
    if budget < 1:
      raise ValueError(f'budget must be >= 1, got {budget}')
    self.workdir = workdir
    self.config = config
    self.evaluator = evaluator
    self.space = evaluator.space
    self.budget = budget
    self.seed = seed
    os.makedirs(workdir, exist_ok=True)
    self._check_config()
    self.history = History(os.path.join(workdir, 'history.jsonl'))
    # Records of an earlier process, by key: answered from here when the replay reaches them.
    self._recorded = {}
    for record in self.history:
      if record.get('kind', 'query') == 'query':
        arch = self.space.parse(record['arch'])
        self._recorded[self.space.canonical_key(arch)] = record
    self._known = {}  # what this search has seen so far (replayed or evaluated)
    self._reserved = set()  # proposed to a non-stationary evaluator, scored next round
    self.queries = 0
    self.replayed = 0
    self.best_record = None
    self._start = time.time()
    self._wall_before = self._previous_wall()
    # Every process has read the directory before the primary appends to it.
    parallel.sync_processes('SearchRun: run directory read')
    self.writer = ScalarWriter(os.path.join(workdir, 'tb'))
    self.progress = Progress(total=budget, what='queries', every=config.get('log_every', 10))
    if self._recorded:
      logging.info('resuming %s: %d of %d queries in history.jsonl will be replayed', workdir,
                   len(self._recorded), budget)

  # -- configuration --------------------------------------------------------------------------

  def _check_config(self) -> None:
    path = os.path.join(self.workdir, 'config.json')
    current = json.loads(json.dumps(self.config, sort_keys=True))
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        previous = json.load(f)
      diff = _config_diff(previous, current)
      if diff:
        raise ValueError(f'{self.workdir} holds a run with a different config ({"; ".join(diff)});'
                         f' use a new --workdir or the original config')
    if parallel.is_primary():
      write_json_atomic(path, current)

  def _previous_wall(self) -> float:
    path = os.path.join(self.workdir, 'results.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        return float(json.load(f).get('wall_s', 0.0))
    return 0.0

  # -- queries --------------------------------------------------------------------------------

  @property
  def remaining(self) -> int:
    return self.budget - self.queries - len(self._reserved)

  def is_known(self, arch) -> bool:
    """Whether the search has evaluated (or reserved) ``arch`` so far, as of the replay position."""
    key = self.space.canonical_key(arch)
    return key in self._known or key in self._reserved

  def fast_forward(self, queries: int) -> None:
    """Marks the first ``queries`` recorded evaluations as seen (resuming from a checkpoint)."""
    for record in self.history.records[:queries]:
      if record['query'] > self.queries:
        arch = self.space.parse(record['arch'])
        self._accept(arch, record)
        self.replayed += 1

  def known_keys(self) -> set:
    return set(self._known) | self._reserved

  # -- non-stationary evaluators (supernets) ---------------------------------------------------

  def reserve(self, archs: Sequence[np.ndarray]) -> None:
    """Counts ``archs`` against the budget now; a later ``score_round`` scores them."""
    for arch in archs:
      key = self.space.canonical_key(arch)
      if key not in self._known:
        self._reserved.add(key)

  def restore_scored(self, before_round: int) -> None:
    """On resume: marks architectures scored in rounds before ``before_round`` as seen."""
    for record in self.history:
      if record.get('kind') == 'score' and record['round'] < before_round:
        arch = self.space.parse(record['arch'])
        key = self.space.canonical_key(arch)
        if key not in self._known:
          self.queries += 1
        self._known[key] = record

  def score_round(self, archs: Sequence[np.ndarray], round_index: int) -> np.ndarray:
    """Scores every architecture of a pool in one evaluator call; ``float64[n]``.

    Each score is recorded (``kind='score'``) with the round. A rerun after a kill reuses a
    complete set of this round's scores from the history; an incomplete set is scored again.
    """
    archs = [self.space.validate(a) for a in archs]
    formatted = [self.space.format(a) for a in archs]
    done = [r for r in self.history if r.get('kind') == 'score' and r['round'] == round_index]
    done = done[-len(archs):]
    if len(done) == len(archs) and [r['arch'] for r in done] == formatted:
      records = done
    else:
      results = self.evaluator.evaluate(np.stack(archs))
      records = []
      for arch, text, result in zip(archs, formatted, results):
        if not np.isfinite(result['score']):
          raise ValueError(f'evaluator returned a non-finite score {result["score"]} for {text}')
        record = dict(result, kind='score', round=round_index, arch=text)
        self.history.append(record)
        records.append(record)
    for arch, record in zip(archs, records):
      key = self.space.canonical_key(arch)
      if key not in self._known:
        self.queries += 1
      self._known[key] = record
      self._reserved.discard(key)
    self.best_record = max(records, key=self._rank)
    scores = np.asarray([r['score'] for r in records], np.float64)
    self.writer.scalar('search/best_score', self.best_record['score'], round_index)
    self.writer.scalar('search/mean_score', float(scores.mean()), round_index)
    self.progress.update(self.queries, best=self.best_record['score'])
    return scores

  def rerank(self, archs: Sequence[np.ndarray]) -> np.ndarray:
    """Re-scores the finalists with the evaluator's ``rerank`` (e.g. stand-alone training).

    The finalists not re-scored before go to the evaluator in one call (so that it can spread
    them over processes); each result is recorded (``kind='rerank'``) and reused on a rerun,
    and the best finalist becomes the run's result. A kill during the call loses no finished
    training: the evaluator keeps each finalist's result in the run directory.
    """
    done = {r['arch']: r for r in self.history if r.get('kind') == 'rerank'}
    todo = {}
    for arch in archs:
      todo.setdefault(self.space.format(arch), np.asarray(arch))
    todo = {text: arch for text, arch in todo.items() if text not in done}
    if todo:
      results = self.evaluator.rerank(np.stack(list(todo.values())))
      for text, result in zip(todo, results):
        done[text] = dict(result, kind='rerank', arch=text)
        self.history.append(done[text])
    records = [done[self.space.format(arch)] for arch in archs]
    self.best_record = max(records, key=self._rank)
    return np.asarray([r['score'] for r in records], np.float64)

  def query(self, archs: Sequence[np.ndarray], round_index: int, source: str) -> np.ndarray:
    """Scores of ``archs`` (``float64[n]``); new ones are evaluated and recorded.

    Args:
      archs: architectures; duplicates (by canonical key) are evaluated once.
      round_index: search round, recorded in the history.
      source: what proposed them (``random``, ``nao``, ``mutation`` ...), recorded.

    Raises:
      BudgetExhausted: the new architectures among ``archs`` exceed the remaining budget (nothing
        is evaluated then).
    """
    archs = [self.space.validate(a) for a in archs]
    keys = [self.space.canonical_key(a) for a in archs]
    new, new_keys = [], set()
    for arch, key in zip(archs, keys):
      if key not in self._known and key not in new_keys:
        new.append(arch)
        new_keys.add(key)
    if len(new) > self.remaining:
      raise BudgetExhausted(f'{len(new)} new architectures requested, {self.remaining} left')
    # One at a time, so that each result is durable before the next evaluation starts.
    for arch in new:
      recorded = self._recorded.get(self.space.canonical_key(arch))
      if recorded is not None:
        if recorded['query'] != self.queries + 1:
          logging.warning('replay diverged: %s was query %d in the history, now %d',
                          recorded['arch'], recorded['query'], self.queries + 1)
        self.replayed += 1
        self._accept(arch, recorded)
        continue
      result = self.evaluator.evaluate(arch[None])[0]
      if not np.isfinite(result['score']):
        raise ValueError(f'evaluator returned a non-finite score {result["score"]} for '
                         f'{self.space.format(arch)}')
      record = dict(result, query=self.queries + 1, round=round_index, source=source,
                    arch=self.space.format(arch))
      self.history.append(record)
      self._accept(arch, record)
      self.writer.scalar('search/best_score', self.best_record['score'], self.queries)
      self.writer.scalar('search/score', record['score'], self.queries)
      self.progress.update(self.queries, best=self.best_record['score'])
    return np.asarray([self._known[key]['score'] for key in keys], np.float64)

  def _accept(self, arch, record: dict) -> None:
    self.queries += 1
    self._known[self.space.canonical_key(arch)] = record
    if self.best_record is None or self._rank(record) > self._rank(self.best_record):
      self.best_record = record

  def _rank(self, record: dict) -> float:
    return record['score'] if self.evaluator.higher_is_better else -record['score']

  # -- results --------------------------------------------------------------------------------

  def best_so_far(self) -> np.ndarray:
    """Best score after each query so far, ``float64[queries]``."""
    records = [r for r in self.history if r.get('kind', 'query') == 'query'][:self.queries]
    scores = np.asarray([r['score'] for r in records])
    if not self.evaluator.higher_is_better:
      return -np.maximum.accumulate(-scores)
    return np.maximum.accumulate(scores)

  def write_results(self, rounds: int, finished: bool, extra: dict | None = None) -> dict:
    """Writes ``results.json`` (atomically) and the best-so-far plot; returns the results.

    In a multi-process run only the primary process writes; every process returns the results.
    """
    best = self.best_record
    results = {
        'best_arch': best['arch'] if best else None,
        'best_score': best['score'] if best else None,
        # After a re-ranking the result is the finalists' stand-alone score, not the supernet's.
        'score_name': (getattr(self.evaluator, 'rerank_score_name', 'rerank_score')
                       if best and best.get('kind') == 'rerank' else self.evaluator.score_name),
        'higher_is_better': self.evaluator.higher_is_better,
        'queries': self.queries,
        'budget': self.budget,
        'rounds': rounds,
        'finished': finished,
        'wall_s': self._wall_before + time.time() - self._start,
        'seed': self.seed,
        'config': self.config,
    }
    results.update(extra or {})
    if not parallel.is_primary():
      return results
    write_json_atomic(os.path.join(self.workdir, 'results.json'), results)
    if self.evaluator.stationary and self.queries:
      plot_best_so_far(self.best_so_far(), os.path.join(self.workdir, 'best_so_far.png'),
                       self.evaluator.score_name)
    self.writer.flush()
    return results

  def close(self) -> None:
    self.history.close()
    self.writer.close()


def _config_diff(previous: dict, current: dict, prefix: str = '') -> list[str]:
  diffs = []
  for key in sorted(set(previous) | set(current)):
    name = prefix + key
    if key in RESUME_TOLERATED_KEYS:
      continue
    a, b = previous.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, name + '.')
    elif a != b:
      diffs.append(f'{name}: {a!r} there, {b!r} now')
  return diffs
