"""Speed of the weight-sharing supernet: training step and pool scoring.

Run: ``python -m benchmarks.supernet`` (PT-V1 search config: N=3 cells per stage, 5 nodes,
C=20, batch 64 of 32x32 images, a new random architecture every step; 600 architectures scored
on 500 images each in one call). Small: ``python -m benchmarks.supernet --layers 1 --channels 8
--batch 16 --score-archs 8 --score-batch 64``. ``--dispatch both`` times both op dispatch
back-ends (the training step only, then scoring with the faster one).

Prints one JSON object on its last line: ``train_step_s`` (median seconds per step after
warm-up), ``compile_s`` (lowering + compilation of the step), ``compiles`` (XLA compilations
during the timed steps; must be 0), ``score_600_archs_s`` (or ``score_<P>_archs_s``: one call
scoring P architectures, compilation excluded), ``score_compile_s``, ``dispatch`` (used for the
figures), per-back-end step times with ``--dispatch both``, and the load average before and
after (the machine is shared: read the figures against it).

Also ``train_step_cpu_s`` / ``score_cpu_s_per_arch``: process CPU seconds, less sensitive than
wall time to other jobs on a shared machine.

Measured on the 2-core shared CPU (jax 0.10.2, 2026-11-28), under other jobs' load:

* reference config, load average 8.4-10.1: ``train_step_s`` 9.74 (CPU 5.06 s), ``compiles`` 0,
  compile 129 s; scoring 9.6 s per architecture (CPU 5.4 s), i.e. ~96 min for 600 (measured on
  10 architectures: ``--score-archs 10``);
* dispatch, N=1 C=20 batch 64, load ~9: switch 4.8 s (CPU 2.3 s), select 20.5 s (CPU 10.3 s):
  ``'switch'`` is the default.

Earlier states of the same code at the reference config (load 5-7) show where the time went:
XLA:CPU's grouped convolution for the depthwise convs and no rematerialisation, 16-25 s per step;
shifted-multiply-add depthwise convs, 15-17 s; plus rematerialised switch branches, 5-6.7 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, machine
from nao_jax.cnn import supernet as sn
from nao_jax.cnn import supernet_train as st
from nao_jax.spaces import WS_SPACE


class CompileCounter:
  """Counts XLA backend compilations (any function) while active."""

  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if self.active and event == self.EVENT:
      self.count += 1


def time_train(args, dispatch: str, counter: CompileCounter) -> dict:
  config = sn.SupernetConfig(layers=args.layers, channels=args.channels, dispatch=dispatch)
  net = sn.Supernet(config)
  tcfg = st.TrainConfig(batch_size=args.batch)
  optimizer = st.make_optimizer(tcfg)
  state = st.create_state(net, optimizer, jax.random.key(0))
  step_fn = st.make_train_step(net, optimizer, total_steps=tcfg.total_steps)
  rng = np.random.default_rng(0)
  archs = WS_SPACE.sample(rng, args.warmup + args.steps + 1)
  key = jax.random.key(1)
  images = jax.random.normal(jax.random.fold_in(key, 0),
                             (args.batch, args.image, args.image, 3), jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, 10, jnp.int32)
  keys = [jax.random.fold_in(key, i + 2) for i in range(len(archs))]

  start = time.perf_counter()
  step_fn.lower(state, images, labels, archs[0], keys[0]).compile()
  compile_s = time.perf_counter() - start
  print(f'[{dispatch}] compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)
  for i in range(args.warmup):
    state, metrics = step_fn(state, images, labels, archs[i], keys[i])
    jax.block_until_ready(metrics)
  cache_before = step_fn._cache_size() if hasattr(step_fn, '_cache_size') else None
  counter.count, counter.active = 0, True
  times, cpu_times = [], []
  for i in range(args.warmup, args.warmup + args.steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = step_fn(state, images, labels, archs[i], keys[i])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  counter.active = False
  cache_after = step_fn._cache_size() if hasattr(step_fn, '_cache_size') else None
  print(f'[{dispatch}] steps: {", ".join(f"{t:.2f}" for t in times)}', file=sys.stderr,
        flush=True)
  out = {'train_step_s': statistics.median(times),
         'train_step_cpu_s': statistics.median(cpu_times), 'compile_s': compile_s,
         'compiles': counter.count, 'loss': float(metrics['loss'])}
  if cache_before is not None:
    out['jit_cache_growth'] = cache_after - cache_before
  return out, state


def time_score(args, dispatch: str, state, counter: CompileCounter) -> dict:
  net = sn.Supernet(sn.SupernetConfig(layers=args.layers, channels=args.channels,
                                      dispatch=dispatch))
  score = st.make_score_fn(net)
  key = jax.random.key(2)
  n_valid = max(args.score_batch, args.valid_size)
  images = jax.random.normal(key, (n_valid, args.image, args.image, 3), jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(key, 1), (n_valid,), 0, 10, jnp.int32)
  archs = WS_SPACE.sample(np.random.default_rng(1), args.score_archs)
  # One fixed batch for every architecture (the evaluator's default).
  indices = np.tile(np.arange(args.score_batch, dtype=np.int32), (args.score_archs, 1))
  count = jnp.asarray(args.score_archs, jnp.int32)
  call = (state.params, state.batch_stats, archs, images, labels, indices, count)
  start = time.perf_counter()
  compiled = score.lower(*call).compile()
  compile_s = time.perf_counter() - start
  print(f'[score] compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)
  counter.count, counter.active = 0, True
  start, cpu_start = time.perf_counter(), time.process_time()
  accuracy, _ = compiled(*call)
  accuracy = np.asarray(accuracy)
  score_s, score_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
  counter.active = False
  return {f'score_{args.score_archs}_archs_s': score_s, 'score_compile_s': compile_s,
          'score_s_per_arch': score_s / args.score_archs,
          'score_cpu_s_per_arch': score_cpu_s / args.score_archs,
          'score_mean_accuracy': float(accuracy.mean())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=3, help='N, normal cells per stage')
  parser.add_argument('--channels', type=int, default=20, help='C, first-stage channels')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image', type=int, default=32, help='image side')
  parser.add_argument('--steps', type=int, default=20, help='timed steps (new arch each)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  parser.add_argument('--dispatch', default='switch', choices=sn.DISPATCHES + ('both',))
  parser.add_argument('--score-archs', type=int, default=600, help='0 skips scoring')
  parser.add_argument('--score-batch', type=int, default=500)
  parser.add_argument('--valid-size', type=int, default=5000)
  args = parser.parse_args()

  load_before = os.getloadavg()
  counter = CompileCounter()
  dispatches = sn.DISPATCHES if args.dispatch == 'both' else (args.dispatch,)
  results, states = {}, {}
  for dispatch in dispatches:
    results[dispatch], states[dispatch] = time_train(args, dispatch, counter)
  best = min(dispatches, key=lambda d: results[d]['train_step_s'])
  out = {'dispatch': best, **results[best]}
  if len(dispatches) > 1:
    for d in dispatches:
      out[f'train_step_s_{d}'] = results[d]['train_step_s']
      out[f'train_step_cpu_s_{d}'] = results[d]['train_step_cpu_s']
      out[f'compile_s_{d}'] = results[d]['compile_s']
      out[f'compiles_{d}'] = results[d]['compiles']
  if args.score_archs:
    out.update(time_score(args, best, states[best], counter))
  out.update(layers=args.layers, channels=args.channels, batch=args.batch, image=args.image,
             steps=args.steps, load_avg_before=[round(x, 2) for x in load_before],
             load_avg_after=[round(x, 2) for x in os.getloadavg()], **machine())
  emit(out)


if __name__ == '__main__':
  main()
