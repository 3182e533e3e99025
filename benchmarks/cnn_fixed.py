"""Training-step benchmark of a fixed-architecture CIFAR network.

Run: ``python -m benchmarks.cnn_fixed`` (NAONet-A, N=6, F=36, batch 128, aux head and
drop-path on); small: ``python -m benchmarks.cnn_fixed --layers 1 --channels 8 --batch 8``.
Prints one JSON object on its last line: ``compile_s`` (lowering + XLA compilation of the
training step), ``train_img_per_s`` (batch / median step time after warm-up), ``params``
(trainable, aux head included), ``img_per_cpu_s`` (batch / CPU seconds of a step, all threads:
independent of other processes competing for the cores) and the load average around the run.
Utilisation: ``step_gflop`` (the convolutions and matmuls of one training step, forward and
backward, counted from its jaxpr), ``mfu`` (their FLOP/s over a 2048^3 float32 matmul's, measured
in the same run) and ``img_per_s_at_matmul_peak`` (the throughput if every convolution ran at that
matmul's rate and everything else took no time: an upper bound for this device).

``--onednn`` sets ``XLA_FLAGS=--xla_cpu_use_onednn=true`` before JAX starts. Off by default: on
this 2-core EPYC it measured no faster (XLA:CPU still runs the convolutions through its YNNPACK
fusions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time



def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='NAONet-A', help='built-in architecture name')
  parser.add_argument('--layers', type=int, default=6, help='N, normal cells per stage')
  parser.add_argument('--channels', type=int, default=36, help='F, first-stage channels')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compilation')
  parser.add_argument('--onednn', action=argparse.BooleanOptionalAction, default=False,
                      help='run XLA:CPU convolutions/matmuls through oneDNN')
  parser.add_argument('--primitives', default='auto', choices=('library', 'shifts', 'auto'),
                      help="NetworkConfig.primitives: 'shifts' = depthwise convs as shifted "
                      'multiply-adds')
  parser.add_argument('--keep_host_memory', action=argparse.BooleanOptionalAction, default=True,
                      help='let glibc keep freed host memory (nao_jax/host_memory.py), as the '
                      'launchers do')
  args = parser.parse_args()
  if args.keep_host_memory:
    from nao_jax import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.keep_freed_memory()
  if args.onednn:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_use_onednn=true')
  # JAX reads XLA_FLAGS when its backend starts, so it is imported only now.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks import flops  # pylint: disable=import-outside-toplevel
  from nao_jax import spaces  # pylint: disable=import-outside-toplevel
  from nao_jax.cnn import network as network_lib  # pylint: disable=import-outside-toplevel
  from nao_jax.cnn import train as train_lib  # pylint: disable=import-outside-toplevel

  load_before = os.getloadavg()[0]
  space, arch = spaces.get_builtin(args.arch)
  config = network_lib.NetworkConfig(layers=args.layers, channels=args.channels,
                                     use_aux_head=True, drop_path_keep=0.8, dropout_keep=0.6,
                                     primitives=args.primitives)
  network = network_lib.FixedNetwork(space, arch, config)
  optimizer = train_lib.make_optimizer(0.025, weight_decay=3e-4)
  state = train_lib.create_train_state(network, optimizer, jax.random.key(0))
  params = network_lib.count_params(state.params)
  step_fn = train_lib.make_train_step(network, optimizer, total_steps=600 * 391)

  key = jax.random.key(1)
  images = jax.random.normal(jax.random.fold_in(key, 0), (args.batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, 10, jnp.int32)
  step = jnp.asarray(1000, jnp.int32)  # drop-path schedule well under way

  step_flops = flops.jaxpr_flops(jax.make_jaxpr(step_fn)(state, images, labels, key, step))
  start = time.perf_counter()
  compiled = step_fn.lower(state, images, labels, key, step).compile()
  compile_s = time.perf_counter() - start
  print(f'compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)

  times, cpu_times = [], []
  for i in range(args.warmup + args.steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, images, labels, jax.random.fold_in(key, i + 2), step)
    jax.block_until_ready((state, metrics))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f'step {i}: {wall:.2f} s wall, {cpu:.2f} s CPU', file=sys.stderr, flush=True)
    if i >= args.warmup:
      times.append(wall)
      cpu_times.append(cpu)
  step_s = statistics.median(times)
  step_cpu_s = statistics.median(cpu_times)
  peak = flops.matmul_flops_per_s()
  result = {
      'arch': args.arch, 'layers': args.layers, 'channels': args.channels, 'batch': args.batch,
      'params': params, 'compile_s': round(compile_s, 2), 'step_s': round(step_s, 3),
      'train_img_per_s': round(args.batch / step_s, 2), 'step_cpu_s': round(step_cpu_s, 2),
      # Wall time is inflated when other processes share the cores; CPU seconds (all threads)
      # per image say how much work a step is, whatever the load.
      'img_per_cpu_s': round(args.batch / step_cpu_s, 2), 'loss': float(metrics['loss']),
      'step_gflop': round(step_flops / 1e9, 2), 'matmul_gflop_per_s': round(peak / 1e9, 1),
      'mfu': round(step_flops / step_s / peak, 3),
      'img_per_s_at_matmul_peak': round(args.batch * peak / step_flops, 2),
      'load_avg_before': round(load_before, 2), 'load_avg_after': round(os.getloadavg()[0], 2),
      'cpus': os.cpu_count(), 'onednn': args.onednn, 'primitives': args.primitives,
      'keep_host_memory': args.keep_host_memory,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
