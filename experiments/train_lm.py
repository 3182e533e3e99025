"""Trains a recurrent cell on PTB / WikiText-2 from an ml_collections config (spec §6.8).

  python -m experiments.train_lm --config=experiments/configs/naonet_ptb.py \
      --workdir=runs/naonet_ptb
  python -m experiments.train_lm --config=experiments/configs/naonet_ptb.py:tiny \
      --workdir=/tmp/naonet_ptb_tiny --config.data_dir=../shared/data/ptb
  python -m experiments.train_lm --workdir=runs/naonet_ptb --evaluate   # score the best state

Rerunning the same command after a kill resumes from the newest checkpoint in --workdir and ends
with the same numbers as an uninterrupted run. Every config key can be overridden
(``--config.train.epochs=10``, ``--config.data_dir=../shared/data/ptb``); a found cell trains
with ``--config.arch= --config.arch_string='0 1 ...' --config.space=rnn_ws``; the official
recipe (lr 20, NT-ASGD) is the ``:official`` variant of every LM config. With ``--evaluate`` the
best-valid checkpoint (or ``--step``, or ``--which=last``) is scored on valid and test and the
metrics printed as one JSON object.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from nao_jax.rnn import lm

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Language-model config file (with --evaluate, default: the config.json of '
    '--workdir).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it exists).')
_EVALUATE = flags.DEFINE_bool('evaluate', False, 'Score a checkpoint instead of training.')
_STEP = flags.DEFINE_integer('step', None, '--evaluate: checkpoint step (default: the newest).')
_WHICH = flags.DEFINE_enum('which', 'best', ['best', 'last'],
                           '--evaluate: the best-valid checkpoints or the regular ones.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  common.setup(argv)
  with common.one_line_errors(lm.DivergenceError):
    if _EVALUATE.value:
      metrics = lm.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value, _WHICH.value)
      print(json.dumps(metrics, sort_keys=True))
      return
    if _CONFIG.value is None:
      raise ValueError('--config is required for training')
    metrics = lm.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if metrics['finished']:
    test = (f'test ppl {metrics["test_ppl"]:.2f}' if metrics['test_ppl'] is not None
            else 'test not evaluated')
    print(f'finished: best valid ppl {metrics["valid_ppl"]:.2f} (epoch {metrics["best_epoch"]}), '
          f'{test}; {metrics["params"]} parameters, {metrics["epochs"]} epochs, '
          f'{metrics["wall_s"]:.0f} s')
    print(f'metrics: {_WORKDIR.value}/metrics.json')
  else:
    print(f'stopped at step {metrics["step"]} (epoch {metrics["epoch"] + 1}, window '
          f'{metrics["window"]}); rerun the command to continue')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
