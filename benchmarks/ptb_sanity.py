"""PTB sanity run: the NAO cell at reduced size, one epoch on the real training set.

  python -m benchmarks.ptb_sanity --data_dir=../shared/data          # ~10 min on 2 busy cores
  python -m benchmarks.ptb_sanity --data_dir=../shared/data --size=200 --test

Trains ``NAONet-PTB`` (NAO activation ids) with the seed recipe of
``experiments/configs/naonet_ptb.py`` (SGD lr 10, clip 0.25, L2 5e-7, dropouts 0.75 / 0.25 /
0.75 / 0.2, TAR 1e-3, batch 64, BPTT 35 with the variable-length sampler, seed 1267) but with
E = H = ``--size`` (default 128 instead of 850; 200 took 16 min on 2 cores shared with other
jobs at a load average of 9.5, about 1,150 training tokens/s) for ``--epochs`` (1) epochs on all
929,589 training tokens, through ``nao_jax.rnn.lm.train_and_evaluate`` (checkpoints, evaluation
and all), in a fresh temporary run directory. It reports the validation perplexity (batch 10, the
reference protocol), optionally the test perplexity (batch 1, ``--test``), and wall times. The
run is deterministic on CPU: the same seed gives the same perplexity.

A sanity reference, not a published number: a model that learns ends far below the uniform
perplexity of 10,000; with the recipe's heavy dropout (0.75 on the outputs) a small model is
still in the hundreds after one epoch.

The figures are printed as one JSON object on the last line, with the load average: the host
is shared, so wall times depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax


def _corpus_dir(path: str) -> str:
  """``path`` itself when it holds the PTB files, else ``path/ptb``."""
  if os.path.exists(os.path.join(path, 'ptb.train.txt')):
    return path
  return os.path.join(path, 'ptb')


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=os.environ.get('NAO_DATA_DIR', ''),
                      help='folder with ptb/ (or the PTB files themselves); default $NAO_DATA_DIR')
  parser.add_argument('--size', type=int, default=128, help='E = H')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--seed', type=int, default=1267)
  parser.add_argument('--test', action='store_true', help='also the test perplexity (batch 1)')
  parser.add_argument('--workdir', default='', help='run directory (default: a fresh temp dir, '
                      'removed afterwards)')
  args = parser.parse_args(argv)
  if not args.data_dir:
    sys.exit('error: pass --data_dir (a folder with ptb/) or set NAO_DATA_DIR')

  from absl import logging  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments.configs import naonet_ptb  # pylint: disable=g-import-not-at-top
  from nao_jax.rnn import lm  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().python_handler.stream = sys.stdout
  common.quiet_orbax()

  config = naonet_ptb.get_config()
  config.seed = args.seed
  config.data_dir = _corpus_dir(args.data_dir)
  config.model.emb_size = config.model.hidden_size = args.size
  config.train.epochs = args.epochs
  config.evaluate_test = args.test
  config.log_every_steps = 25
  workdir = args.workdir or tempfile.mkdtemp(prefix='ptb_sanity_')
  load_before = os.getloadavg()
  start = time.time()
  try:
    with common.one_line_errors(lm.DivergenceError):
      metrics = lm.train_and_evaluate(config, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  result = {
      'benchmark': 'ptb_sanity',
      'arch': metrics['arch_name'],
      'size': args.size,
      'batch_size': config.train.batch_size,
      'bptt': config.train.bptt,
      'epochs': metrics['epochs'],
      'steps': metrics['steps'],
      'params': metrics['params'],
      'seed': args.seed,
      'valid_ppl': metrics['valid_ppl'],
      'valid_nll': metrics['valid_nll'],
      'test_ppl': metrics['test_ppl'],
      'train_tok_per_s': round(metrics['train_tok_per_s'], 1),
      'wall_s': round(time.time() - start, 1),
      'load_avg_before': [round(v, 2) for v in load_before],
      'load_avg_after': [round(v, 2) for v in os.getloadavg()],
      'cpu_count': os.cpu_count(),
      'backend': jax.default_backend(),
      'jax': jax.__version__,
  }
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
