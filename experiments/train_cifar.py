"""Trains a fixed architecture on CIFAR-10/100 from an ml_collections config (spec §6).

  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar10.py \
      --workdir=runs/naonet_a_c10
  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar10.py:tiny \
      --workdir=/tmp/tiny                       # seconds on a laptop, synthetic data

Rerunning the same command after a kill resumes from the newest checkpoint in --workdir and
ends with the same numbers as an uninterrupted run. Every config key can be overridden
(``--config.train.epochs=10``, ``--config.data.path=../shared/data``); a found cell trains with
``--config.arch= --config.arch_string='0 1 ...' --config.space=cnn_ws``.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from nao_jax.cnn import final

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if it exists).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  common.setup(argv)
  with common.one_line_errors(final.DivergenceError):
    metrics = final.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  split = metrics['eval_split']
  state = 'finished' if metrics['finished'] else f'stopped at step {metrics["step"]}'
  print(f'{state}: {split} accuracy {metrics[f"{split}_accuracy"]:.4f} '
        f'(error {100 * metrics[f"{split}_error"]:.2f} %), {metrics["params"]["total"]} '
        f'parameters, {metrics["epochs"]:g} epochs, {metrics["wall_s"]:.0f} s')
  if metrics['finished']:
    print(f'metrics: {_WORKDIR.value}/metrics.json')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
