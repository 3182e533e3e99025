"""Does the weight-sharing supernet learn on real CIFAR-10, and do its scores settle?

  python -m benchmarks.ws_sanity --data_dir=../shared/data [--per_class=400 --epochs=2,4]

A reduced PT-V1 search supernet (``--layers`` cells per stage, ``--channels`` channels, batch
64, SGD 0.025 -> 0.001 cosine, drop-path keep 0.9, clip 5, uniform sampling from the pool)
trains on ``10 * per_class`` real CIFAR-10 training images (the first ``per_class`` of each class
in ``cifar10/cifar10_jpeg.tar.gz``, 500 of them held out as the dev split) for the epochs of
the two checkpoints (``--epochs=2,4``: score after 2 epochs, train 2 more, score again). At each
checkpoint the ``--pool`` (20) random architectures are scored with the shared weights on the
same 500 dev images (one compiled program for the pool, BN batch statistics), through
``nao_jax.cnn.ws_evaluator.SupernetEvaluator`` exactly as a search does.

Reports, as one JSON object on the last line: the spread of the pool's scores at each
checkpoint (min, max, std), the Kendall tau and Spearman rho between the two checkpoints'
scores (how stable the ranking the controller trains on is), the last training loss and
accuracy, seconds per training step and the wall time, with the load average (shared cores).
"""

import argparse
import os
import time

import numpy as np

from benchmarks import common
from nao_jax import metrics
from nao_jax.cnn import supernet as supernet_lib
from nao_jax.cnn import supernet_train as st
from nao_jax.cnn import ws_evaluator
from nao_jax.data import search_split
from nao_jax.spaces import WS_SPACE


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.environ.get('NAO_DATA_DIR', '../shared/data'))
  parser.add_argument('--per_class', type=int, default=400, help='training images per class')
  parser.add_argument('--epochs', default='2,4', help='supernet epochs at the two checkpoints')
  parser.add_argument('--pool', type=int, default=20)
  parser.add_argument('--layers', type=int, default=1)
  parser.add_argument('--channels', type=int, default=16)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  first, second = (int(e) for e in args.epochs.split(','))
  if not 0 < first < second:
    raise SystemExit(f'error: --epochs needs two increasing epoch counts, got {args.epochs}')
  load_before = os.getloadavg()[0]
  start = time.time()
  data = search_split.load_search_data(dict(
      source='folder', path=os.path.join(args.data_dir, 'cifar10', 'cifar10_jpeg.tar.gz'),
      limit_per_class=args.per_class, num_dev=500, dev_seed=args.seed))
  data_s = time.time() - start
  config = ws_evaluator.WsEvaluatorConfig(
      supernet=supernet_lib.SupernetConfig(layers=args.layers, channels=args.channels),
      train=st.TrainConfig(batch_size=64, epochs=second),
      score_batch_size=500, log_every=0, seed=args.seed)
  evaluator = ws_evaluator.SupernetEvaluator(config, data.x_train, data.y_train, data.x_valid,
                                             data.y_valid)
  pool = WS_SPACE.sample(np.random.default_rng(args.seed), args.pool)
  spe = evaluator.train_config.steps_per_epoch

  compile_start = time.time()
  evaluator.train_steps(pool, 1)     # compiles the training step; counted as training
  compile_s = time.time() - compile_start
  timed_steps, train_s = 0, 0.0
  scores = []
  for epochs in (first, second - first):
    num = epochs * spe - (1 if not scores else 0)
    t0 = time.time()
    evaluator.train_steps(pool, num)
    train_s += time.time() - t0
    timed_steps += num
    scores.append(evaluator.score(pool))   # the pool in one program, as a search round does
  last = evaluator.last_metrics
  steps = second * spe

  def spread(s):
    return {'min': float(s.min()), 'max': float(s.max()), 'std': float(s.std())}

  common.emit({
      'kendall_tau': metrics.kendall_tau(scores[0], scores[1]),
      'spearman_rho': float(np.corrcoef(np.argsort(np.argsort(scores[0])),
                                        np.argsort(np.argsort(scores[1])))[0, 1]),
      **{f'scores_epoch{first}_{k}': v for k, v in spread(scores[0]).items()},
      **{f'scores_epoch{second}_{k}': v for k, v in spread(scores[1]).items()},
      'train_loss': last.get('loss'), 'train_accuracy': last.get('accuracy'),
      'train_step_s': train_s / timed_steps, 'first_step_s': compile_s, 'steps': steps,
      'pool': args.pool,
      'train_images': len(data.x_train), 'dev_images': len(data.x_valid),
      'layers': args.layers, 'channels': args.channels, 'epochs': [first, second],
      'data_load_s': data_s, 'wall_s': time.time() - start,
      'load_avg_before': round(load_before, 2), 'load_avg_after': round(os.getloadavg()[0], 2),
      **common.machine(),
  })


if __name__ == '__main__':
  main()
