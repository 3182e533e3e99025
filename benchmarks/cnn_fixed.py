"""Training-step benchmark of a fixed-architecture CIFAR network.

Run: ``python -m benchmarks.cnn_fixed`` (NAONet-A, N=6, F=36, batch 128, aux head and
drop-path on); small: ``python -m benchmarks.cnn_fixed --layers 1 --channels 8 --batch 8``.
Prints one JSON object on its last line: ``compile_s`` (lowering + XLA compilation of the
training step), ``train_img_per_s`` (batch / median step time after warm-up), ``params``
(trainable, aux head included) and the load average of the machine around the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from nao_jax import spaces
from nao_jax.cnn import network as network_lib
from nao_jax.cnn import train as train_lib


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='NAONet-A', help='built-in architecture name')
  parser.add_argument('--layers', type=int, default=6, help='N, normal cells per stage')
  parser.add_argument('--channels', type=int, default=36, help='F, first-stage channels')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compilation')
  args = parser.parse_args()

  load_before = os.getloadavg()[0]
  space, arch = spaces.get_builtin(args.arch)
  config = network_lib.NetworkConfig(layers=args.layers, channels=args.channels,
                                     use_aux_head=True, drop_path_keep=0.8, dropout_keep=0.6)
  network = network_lib.FixedNetwork(space, arch, config)
  optimizer = train_lib.make_optimizer(0.025, weight_decay=3e-4)
  state = train_lib.create_train_state(network, optimizer, jax.random.key(0))
  params = network_lib.count_params(state.params)
  step_fn = train_lib.make_train_step(network, optimizer, total_steps=600 * 391)

  key = jax.random.key(1)
  images = jax.random.normal(jax.random.fold_in(key, 0), (args.batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, 10, jnp.int32)
  step = jnp.asarray(1000, jnp.int32)  # drop-path schedule well under way

  start = time.perf_counter()
  compiled = step_fn.lower(state, images, labels, key, step).compile()
  compile_s = time.perf_counter() - start
  print(f'compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)

  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, images, labels, jax.random.fold_in(key, i + 2), step)
    jax.block_until_ready((state, metrics))
    print(f'step {i}: {time.perf_counter() - start:.2f} s', file=sys.stderr, flush=True)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  result = {
      'arch': args.arch, 'layers': args.layers, 'channels': args.channels, 'batch': args.batch,
      'params': params, 'compile_s': round(compile_s, 2), 'step_s': round(step_s, 3),
      'train_img_per_s': round(args.batch / step_s, 2), 'loss': float(metrics['loss']),
      'load_avg_before': round(load_before, 2), 'load_avg_after': round(os.getloadavg()[0], 2),
      'cpus': os.cpu_count(),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
