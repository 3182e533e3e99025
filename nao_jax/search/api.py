"""``run_search(config, workdir)``: one entry point for launchers, notebooks and tests."""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Mapping

from absl import logging

from nao_jax import parallel, spaces, viz
from nao_jax.controller import ControllerConfig
from nao_jax.data import nb201 as nb201_data
from nao_jax.search import baselines
from nao_jax.search.evaluators import Evaluator, TabularEvaluator
from nao_jax.search.nao import NaoSearchConfig, nao_search
from nao_jax.search.run import SearchRun

SEARCHERS = ('nao', 'random', 'evolution')


def _as_dict(config) -> dict:
  return config.to_dict() if hasattr(config, 'to_dict') else dict(config)


def _section(cls, values: Mapping[str, Any], name: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'unknown {name} config key(s) {unknown}; known: {sorted(known)}')
  return cls(**values)


# Evaluators by name: 'module:function' with ``function(config: dict, workdir: str) -> Evaluator``.
# Imported lazily, so a tabular search never imports the CNN or RNN code.
EVALUATORS = {
    'tabular': 'nao_jax.search.api:tabular_evaluator',
    'ws_cnn': 'nao_jax.cnn.ws_evaluator:from_config',
    'scratch_cnn': 'nao_jax.cnn.scratch_evaluator:from_config',
    'ws_rnn': 'nao_jax.rnn.ws_evaluator:from_config',
}


def tabular_evaluator(config: Mapping[str, Any], workdir: str | None = None) -> TabularEvaluator:
  del workdir
  path = config.get('table') or nb201_data.default_table_path()
  return TabularEvaluator(nb201_data.load_table(path))


def build_evaluator(config: Mapping[str, Any], workdir: str | None = None) -> Evaluator:
  """The evaluator named by ``config['evaluator']`` (reads its data now, so errors come early)."""
  name = config.get('evaluator', 'tabular')
  if name not in EVALUATORS:
    raise ValueError(f'unknown evaluator {name!r}; known: {", ".join(EVALUATORS)}')
  module_name, function = EVALUATORS[name].split(':')
  module = importlib.import_module(module_name)
  return getattr(module, function)(config, workdir)


def run_search(config, workdir: str, evaluator: Evaluator | None = None) -> dict:
  """Runs (or resumes) the search described by ``config`` in ``workdir``; returns results.json.

  Everything is checked before any evaluation: the searcher name, the config sections, the
  evaluator's data, and that the budget covers the seed pool.

  Raises:
    ValueError / FileNotFoundError: with a one-line message naming the bad value.
  """
  config = _as_dict(config)
  searcher = config.get('searcher', 'nao')
  if searcher not in SEARCHERS:
    raise ValueError(f'searcher = {searcher!r}; choose one of {SEARCHERS}')
  budget, seed = int(config['budget']), int(config['seed'])
  if budget < 1:
    raise ValueError(f'budget must be >= 1, got {budget}')
  space = evaluator.space if evaluator else spaces.get_space(config.get('space', 'nb201'))
  if searcher == 'nao':
    nao_cfg = _section(NaoSearchConfig, config.get('nao', {}), 'nao')
    controller_cfg = ControllerConfig.for_space(space, **config.get('controller', {}))
    if budget < nao_cfg.seed_pool_size:
      raise ValueError(f'budget {budget} is smaller than the seed pool '
                       f'(nao.seed_pool_size = {nao_cfg.seed_pool_size})')
  elif searcher == 'evolution':
    evolution = dict(config.get('evolution', {}))
    unknown = sorted(set(evolution) - {'population_size', 'sample_size'})
    if unknown:
      raise ValueError(f'unknown evolution config key(s) {unknown}')
  evaluator = evaluator or build_evaluator(config, workdir)
  if evaluator.space is not space:
    raise ValueError(f'space = {space.name!r} but the evaluator scores {evaluator.space.name!r}')
  run = SearchRun(workdir, config, evaluator, budget, seed)
  try:
    if searcher == 'nao':
      rounds = nao_search(run, nao_cfg, controller_cfg, seed)
    elif searcher == 'random':
      rounds = baselines.random_search(run, seed)
    else:
      rounds = baselines.regularized_evolution(run, seed, **evolution)
    extra = {'searcher': searcher}
    # Drawings are files of the run directory: the primary process makes them.
    if run.best_record is not None and config.get('draw', True) and parallel.is_primary():
      extra['drawings'] = [os.path.relpath(p, workdir) for p in viz.draw_arch(
          run.space, run.space.parse(run.best_record['arch']), workdir, name='best_arch')]
    results = run.write_results(rounds, finished=True, extra=extra)
  finally:
    run.close()
  logging.info('best %s %.4f after %d queries: %s', results['score_name'], results['best_score'],
               results['queries'], results['best_arch'])
  return results
