"""Launches a NAO search (or a baseline) from an ml_collections config file.

  python -m experiments.search --config=experiments/configs/nb201.py --workdir=/tmp/nb201 \
      --config.budget=100 --config.searcher=nao

Rerunning the same command after a kill resumes the run in --workdir.
"""

import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nao_jax.search import run_search

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Search config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  try:
    results = run_search(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(f"best {results['score_name']} {results['best_score']:.4f} after {results['queries']} "
        f"queries: {results['best_arch']}")
  print(f'results: {_WORKDIR.value}/results.json, history: {_WORKDIR.value}/history.jsonl')


def parse_flags(argv):
  """absl flag parsing with a one-line error (bad config keys or values) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # config_flags: an override of a key that does not exist
    found = re.search(r'[A-Za-z_][A-Za-z0-9_]*', str(e))
    key = found.group(0) if found else ''
    culprit = next((a for a in argv[1:] if key and key in a), key)
    sys.exit(f'error: {culprit}: no such config key')
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines() or [type(e).__name__]
    sys.exit(f'error: {lines[0]}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
