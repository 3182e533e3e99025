"""Launches a NAO search (or a baseline) from an ml_collections config file.

  python -m experiments.search --config=experiments/configs/nb201.py --workdir=runs/nb201 \
      --config.budget=100 --config.searcher=nao
  python -m experiments.search --config=experiments/configs/quickstart.py --workdir=runs/quickstart

Rerunning the same command after a kill resumes the run in --workdir.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from nao_jax.search import run_search

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Search config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  common.setup(argv)
  with common.one_line_errors():
    results = run_search(_CONFIG.value, _WORKDIR.value)
  workdir = _WORKDIR.value
  print(f"best {results['score_name']} {results['best_score']:.4f} after {results['queries']} "
        f"architectures, {results['rounds']} rounds: {results['best_arch']}")
  for path in results.get('drawings', []):
    print(f'drawing: {os.path.join(workdir, path)}')
  print(f'results: {workdir}/results.json, history: {workdir}/history.jsonl')


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
