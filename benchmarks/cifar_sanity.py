"""Real-data sanity check of the final-training pipeline: a small NAONet-A on real CIFAR-10.

Run: ``python -m benchmarks.cifar_sanity --data_dir=../shared/data``.

Trains NAONet-A (N=1, F=16; no auxiliary head, which would add about 0.43 M parameters and a
second classifier's compile to this 0.54 M network) for 2 epochs on the first 1,000 training
images of each class (10,000) of the shared JPEG copy of CIFAR-10 (``cifar10/cifar10_jpeg.tar.gz``), and scores
it on all 10,000 test images. Everything else is the seed recipe of
``experiments/configs/naonet_a_cifar10.py`` (batch 128, SGD momentum 0.9, cosine 0.024 -> 0 over
the 2 epochs, L2 5e-4, clip 5, drop-path keep 0.7, dropout keep 0.6, cutout 16, per-image
standardisation), through ``nao_jax.cnn.final.train_and_evaluate`` in a fresh run directory.

Prints one JSON object on its last line: ``test_acc`` (chance is 0.1), ``test_loss``,
``wall_s`` (all of it: decoding, compiling, training, evaluating), ``data_load_s``,
``train_img_per_s``, ``params``, and the load average around the run (the cores may be shared).
On CPU two runs give the same ``test_acc``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from absl import logging

from benchmarks import common
from experiments import common as launcher_common
from experiments.configs import naonet_a_cifar10
from nao_jax.cnn import final


def sanity_config(data_dir: str, epochs: int, per_class: int, layers: int, channels: int,
                  batch: int, seed: int):
  config = naonet_a_cifar10.get_config()
  config.seed = seed
  config.model.layers = layers
  config.model.channels = channels
  config.model.use_aux_head = False
  config.data.source = 'folder'
  config.data.path = os.path.join(data_dir, 'cifar10', 'cifar10_jpeg.tar.gz')
  config.data.limit_per_class = per_class
  config.train.epochs = epochs
  config.train.batch_size = batch
  config.train.eval_batch_size = 500
  config.log_every_steps = 20
  config.eval_every_epochs = epochs  # only the final evaluation
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.environ.get('NAO_DATA_DIR', '../shared/data'))
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--per_class', type=int, default=1000, help='training images per class')
  parser.add_argument('--layers', type=int, default=1)
  parser.add_argument('--channels', type=int, default=16)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='', help='run directory (default: a fresh temporary '
                      'one; an existing run directory would be resumed)')
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  launcher_common.quiet_orbax()
  load_before = os.getloadavg()[0]
  config = sanity_config(args.data_dir, args.epochs, args.per_class, args.layers, args.channels,
                         args.batch, args.seed)
  workdir = args.workdir or tempfile.mkdtemp(prefix='cifar_sanity_')
  start = time.time()
  metrics = final.train_and_evaluate(config, workdir)
  common.emit({
      'test_acc': metrics['test_accuracy'], 'test_loss': metrics['test_loss'],
      'test_images': metrics['test_count'], 'train_images': 10 * args.per_class,
      'epochs': metrics['epochs'], 'steps': metrics['step'], 'params': metrics['params']['total'],
      'arch': 'NAONet-A', 'layers': args.layers, 'channels': args.channels, 'aux_head': False,
      'batch': args.batch, 'seed': args.seed, 'wall_s': time.time() - start,
      'data_load_s': metrics['data_load_s'], 'train_img_per_s': metrics['train_img_per_s'],
      'load_avg_before': round(load_before, 2), 'load_avg_after': round(os.getloadavg()[0], 2),
      **common.machine(), 'workdir': workdir,
  })


if __name__ == '__main__':
  main()
