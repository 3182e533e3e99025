"""NAO vs random search vs regularized evolution on the NAS-Bench-201 table.

  python -m benchmarks.nb201_search --data_dir=../shared/data [--seeds=20] [--budgets=50,100,300]

Each searcher runs once per seed at the largest budget, through the same harness as
``experiments.search`` (``nao_jax.search.run_search``, with ``experiments/configs/nb201.py``).
Every searcher here is budget-independent up to truncation (a run with budget B evaluates exactly
the first B architectures of a run with a larger budget; ``tests/test_search.py`` checks this), so
the best validation accuracy within the first B queries of that run is the result at budget B.

Prints ``{nao,random,evolution}_{B}_{mean,std}`` (best validation accuracy found, %, over seeds)
as one JSON object on the last line, with ``{searcher}_sources`` (queries per history source,
summed over seeds: ``pool``, ``nao``, ``mutation``, ``screened``, ``random``) and
``{searcher}_best_sources`` (the source of each run's best architecture), which show what each
generator contributed.
Reference on this table (mean over 200 runs): random 91.01 at 100 and 91.26 at 300 queries;
regularized evolution (population 20, sample 5) 91.43 at 100 and 91.57 at 300; the optimum is
91.607.
"""

import collections
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from benchmarks import common
from experiments.configs import nb201 as nb201_config
from nao_jax.data import nb201 as nb201_data
from nao_jax.search import build_evaluator, run_search

_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('NAO_DATA_DIR'), 'Shared data root.')
_SEEDS = flags.DEFINE_integer('seeds', 20, 'Seeds per searcher.')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'First seed.')
_BUDGETS = flags.DEFINE_list('budgets', ['50', '100', '300'], 'Query budgets.')
_SEARCHERS = flags.DEFINE_list('searchers', ['nao', 'random', 'evolution'], 'Searchers.')
_OVERRIDES = flags.DEFINE_string('nao_overrides', '{}', 'JSON dict merged into the nao section.')
_CONTROLLER = flags.DEFINE_string('controller_overrides', '{}',
                                  'JSON dict merged into the controller section.')


def best_at(history: list[dict], budgets: list[int]) -> dict[int, float]:
  scores = np.maximum.accumulate([r['score'] for r in history])
  return {b: float(scores[b - 1]) for b in budgets}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  budgets = sorted(int(b) for b in _BUDGETS.value)
  table = nb201_data.default_table_path(_DATA_DIR.value)
  config = nb201_config.get_config().to_dict()
  config.update(table=table, budget=budgets[-1], log_every=10**9)
  config['nao'].update(json.loads(_OVERRIDES.value))
  config['controller'].update(json.loads(_CONTROLLER.value))
  evaluator = build_evaluator(config)  # read the table once for all runs
  results, per_searcher = {}, {}
  for searcher in _SEARCHERS.value:
    found = {b: [] for b in budgets}
    sources, best_sources = collections.Counter(), collections.Counter()
    start = time.time()
    for seed in range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value):
      with tempfile.TemporaryDirectory() as workdir:
        run_search(dict(config, searcher=searcher, seed=seed), workdir, evaluator=evaluator)
        with open(os.path.join(workdir, 'history.jsonl')) as f:
          history = [json.loads(line) for line in f]
      sources.update(r['source'] for r in history)
      best_sources[max(history, key=lambda r: r['score'])['source']] += 1
      for budget, best in best_at(history, budgets).items():
        found[budget].append(best)
      print(f'{searcher} seed {seed}: ' + ', '.join(f'{b}: {found[b][-1]:.3f}' for b in budgets),
            flush=True)
    per_searcher[f'{searcher}_wall_s'] = time.time() - start
    per_searcher[f'{searcher}_sources'] = dict(sorted(sources.items()))
    per_searcher[f'{searcher}_best_sources'] = dict(sorted(best_sources.items()))
    for budget in budgets:
      results[f'{searcher}_{budget}_mean'] = float(np.mean(found[budget]))
      results[f'{searcher}_{budget}_std'] = float(np.std(found[budget]))
      results[f'{searcher}_{budget}_found_optimum'] = int(
          np.sum(np.isclose(found[budget], evaluator.table.accuracy.max())))
  common.emit({**results, **per_searcher, 'seeds': _SEEDS.value, 'first_seed': _FIRST_SEED.value,
               'optimum': float(evaluator.table.accuracy.max()),
               'nao_config': config['nao'], 'controller_config': config['controller'],
               **common.machine()})


if __name__ == '__main__':
  app.run(main)
