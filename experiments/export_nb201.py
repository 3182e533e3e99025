"""Exports a NAS-Bench-201 table (CSV) from the official NATS-Bench API.

  pip install nats_bench
  python -m experiments.export_nb201 --nats_path=$TORCH_HOME/NATS-tss-v1_0-3ffb9-simple \
      --dataset=cifar10-valid --hp=200 --out=nb201_cifar10valid_valid_acc.csv

Writes ``index,arch_str,valid_accuracy,train_seconds`` for all 15,625 cells: the validation
accuracy (%, mean over the benchmark's seeds, ``is_random=False``) and the simulated training
time of ``hp`` epochs, the columns ``experiments.search`` reads (``--config.table=...``).
"""

import csv
import os
import sys

from absl import app
from absl import flags

_NATS_PATH = flags.DEFINE_string('nats_path', None, 'NATS-Bench topology (tss) archive or dir.')
_DATASET = flags.DEFINE_enum('dataset', 'cifar10-valid',
                             ['cifar10-valid', 'cifar10', 'cifar100', 'ImageNet16-120'], 'Dataset.')
_HP = flags.DEFINE_enum('hp', '200', ['12', '200'], 'Training epochs of the benchmark.')
_OUT = flags.DEFINE_string('out', None, 'Output CSV path.')


def export_table(api, dataset: str, hp: str, out: str) -> int:
  """Writes the CSV from a NATS-Bench ``api`` object; returns the number of rows.

  The file is written to ``out + '.tmp'`` and renamed when complete.
  """
  tmp = out + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['index', 'arch_str', 'valid_accuracy', 'train_seconds'])
    for index in range(len(api)):
      info = api.get_more_info(index, dataset, hp=hp, is_random=False)
      accuracy = info.get('valid-accuracy', info.get('valtest-accuracy'))
      if accuracy is None:
        raise ValueError(f'cell {index}: NATS-Bench returned no validation accuracy for '
                         f'{dataset} (keys: {sorted(info)})')
      writer.writerow([index, api.arch(index), f'{accuracy:.8f}',
                       f'{info.get("train-all-time", float("nan")):.6f}'])
  os.replace(tmp, out)
  return len(api)


def main(argv):
  del argv
  if not _NATS_PATH.value or not _OUT.value:
    sys.exit('error: --nats_path and --out are required')
  try:
    from nats_bench import create  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('error: the official API is needed: pip install nats_bench')
  api = create(_NATS_PATH.value, 'tss', fast_mode=True, verbose=False)
  rows = export_table(api, _DATASET.value, _HP.value, _OUT.value)
  print(f'wrote {rows} cells to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
