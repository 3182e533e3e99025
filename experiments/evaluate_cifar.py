"""Scores a checkpoint of a train_cifar run directory on the CIFAR test set (or dev split).

  python -m experiments.evaluate_cifar --workdir=runs/naonet_a_c10            # its config.json
  python -m experiments.evaluate_cifar --config=experiments/configs/naonet_a_cifar10.py \
      --workdir=runs/naonet_a_c10 --step=23400 --config.data.path=/data/cifar

Prints the metrics as one JSON object and writes them to ``<workdir>/eval_<step>.json``. BN runs
in inference mode; the newest checkpoint is used unless --step is given.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from nao_jax.cnn import final

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (default: the config.json of --workdir).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory of experiments.train_cifar.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  common.setup(argv)
  with common.one_line_errors():
    metrics = final.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
  print(json.dumps(metrics, sort_keys=True))


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
