"""Speed of the recurrent language model: ``python -m benchmarks.rnn [--steps N] [--ws_steps N]``.

* Fixed cell: the NAO PTB model (NAONet-PTB cell, E = H = 850, V = 10,000, batch 64, BPTT 35),
  one full training step (dropouts, TAR, softmax, backward, clip, SGD). ``train_tok_per_s`` is
  ``T * B`` over the median step time after warm-up; ``mfu`` is model FLOP/s over the FLOP/s of a
  2048^3 float32 matmul measured right before each step (median over steps); ``mfu_cpu_time`` is
  the same ratio with process CPU time in place of wall time for both, which other processes on a
  shared host disturb much less; ``train_tok_per_cpu_s`` is tokens per CPU-second of this process
  (times the number of cores: what an idle machine would give with perfect thread scaling).
  Model FLOPs count only the matmuls, 2·m·n·k
  forward (``x @ W0[:E]`` and ``h @ W0[E:]``, the 11 node matmuls, the 850 x 10,000 softmax),
  times 3 for forward + backward; the embedding lookup and elementwise work are not counted.
* Weight-sharing supernet at the WS search config (E = H = 300, batch 256, BPTT 35): median
  ``ws_step_s`` over 20 steps with a different random architecture each, and ``compiles``: the
  number of XLA compilations during those 20 steps (0 = the architecture really is data).

The figures are printed as one JSON object on the last line. The host is shared: note the load
average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nao_jax.rnn import model as model_lib
from nao_jax.rnn import train as train_lib
from nao_jax.spaces import RNN_WS_SPACE

_COMPILES = [0]
_MATMUL = jax.jit(jnp.matmul)


def _on_event(event: str, duration: float, **_) -> None:
  del duration
  if event == '/jax/core/compile/backend_compile_duration':
    _COMPILES[0] += 1


def _cache_size(fn) -> int:
  """Entries in a jitted function's cache (private API: -1 where it does not exist)."""
  size = getattr(fn, '_cache_size', None)
  return size() if size is not None else -1


def matmul_rates(n: int = 2048, repeats: int = 3) -> tuple[float, float]:
  """FLOP/s of an ``n x n @ n x n`` float32 matmul: (per wall second, per process-CPU second).

  Medians of ``repeats`` runs. The CPU-time rate is what the machine gives one busy CPU-second;
  comparing CPU-time rates is far less sensitive to other processes than comparing wall times.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = _MATMUL
  f(a, b).block_until_ready()
  wall, cpu = [], []
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    f(a, b).block_until_ready()
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  flops = 2 * n**3
  return flops / statistics.median(wall), flops / statistics.median(cpu)


def model_flops(cfg: model_lib.LMConfig, seq_len: int, batch: int) -> float:
  """Matmul FLOPs of one training step (forward x 3)."""
  e, h, v = cfg.emb_size, cfg.hidden_size, cfg.vocab_size
  per_token = 2 * ((e + h) * 2 * h + 11 * h * 2 * h + h * v)
  return 3.0 * per_token * seq_len * batch


def _window(rng: np.random.Generator, cfg: model_lib.LMConfig, seq_len: int, batch: int):
  tokens = rng.integers(0, cfg.vocab_size, (seq_len + 1, batch), dtype=np.int32)
  return tokens[:-1], tokens[1:]


def time_fixed(steps: int, warmup: int, seq_len: int = 35, batch: int = 64) -> dict:
  """Training-step time of the NAO PTB model."""
  cfg = model_lib.builtin_config('NAONet-PTB')
  tc = train_lib.TrainConfig(lr=20.0, weight_decay=8e-7)
  state = train_lib.init_train_state(model_lib.init_params(jax.random.PRNGKey(0), cfg), tc)
  hidden = model_lib.init_hidden(batch, cfg)
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(1)
  flops = model_flops(cfg, seq_len, batch)
  times, cpu_times, mfu, mfu_cpu, peaks = [], [], [], [], []
  for i in range(warmup + steps):
    inputs, targets = _window(rng, cfg, seq_len, batch)
    if i >= warmup:  # the peak is re-measured next to every step: the host is shared
      peak, peak_cpu = matmul_rates()
    t0, c0 = time.perf_counter(), time.process_time()
    state, hidden, metrics = train_lib.train_step(
        state, inputs, targets, hidden, jax.random.fold_in(key, i), np.float32(1.0),
        np.int32(seq_len), model_config=cfg, train_config=tc)
    jax.block_until_ready((state, metrics))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if i == 0:
      first_s = wall
    if i >= warmup:
      times.append(wall)
      cpu_times.append(cpu)
      mfu.append(flops / wall / peak)
      mfu_cpu.append(flops / cpu / peak_cpu)
      peaks.append(peak)
  step_s = statistics.median(times)
  return {'step_s': step_s, 'flops': flops, 'tok_per_s': seq_len * batch / step_s,
          'mfu': statistics.median(mfu), 'mfu_cpu': statistics.median(mfu_cpu),
          'peak': statistics.median(peaks), 'compile_s': first_s - step_s,
          'tok_per_cpu_s': seq_len * batch / statistics.median(cpu_times),
          'loss': float(metrics['loss'])}


def time_ws(steps: int, warmup: int, seq_len: int = 35, batch: int = 256) -> dict:
  """Supernet step time with a new random architecture every step, and compiles after warm-up."""
  cfg = model_lib.ws_search_config()
  tc = train_lib.TrainConfig(lr=0.25, clip=10.0, weight_decay=5e-7)
  state = train_lib.init_train_state(model_lib.init_params(jax.random.PRNGKey(0), cfg), tc)
  hidden = model_lib.init_hidden(batch, cfg)
  rng = np.random.default_rng(0)
  archs = RNN_WS_SPACE.sample(rng, warmup + steps)
  key = jax.random.PRNGKey(1)
  times = []
  compiles_before = cache_before = None
  for i in range(warmup + steps):
    if i == warmup:
      compiles_before, cache_before = _COMPILES[0], _cache_size(train_lib.train_step)
    inputs, targets = _window(rng, cfg, seq_len, batch)
    t0 = time.perf_counter()
    state, hidden, metrics = train_lib.train_step(
        state, inputs, targets, hidden, jax.random.fold_in(key, i), np.float32(1.0),
        np.int32(seq_len), archs[i], model_config=cfg, train_config=tc)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return {'step_s': statistics.median(times), 'compiles': _COMPILES[0] - compiles_before,
          'cache_growth': _cache_size(train_lib.train_step) - cache_before,
          'loss': float(metrics['loss'])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5, help='timed fixed-cell steps')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--ws_steps', type=int, default=20, help='timed supernet steps')
  parser.add_argument('--skip_ws', action='store_true')
  args = parser.parse_args()
  jax.monitoring.register_event_duration_secs_listener(_on_event)

  load_before = os.getloadavg()[0]
  fixed = time_fixed(args.steps, args.warmup)
  print(f'fixed: {fixed}', flush=True)
  result = {
      'train_tok_per_s': round(fixed['tok_per_s'], 1),
      'mfu': round(fixed['mfu'], 3),
      'mfu_cpu_time': round(fixed['mfu_cpu'], 3),
      'step_s': round(fixed['step_s'], 3),
      'model_gflop_per_step': round(fixed['flops'] / 1e9, 1),
      'matmul_gflop_per_s': round(fixed['peak'] / 1e9, 1),
      'compile_s': round(fixed['compile_s'], 1),
      'train_tok_per_cpu_s': round(fixed['tok_per_cpu_s'], 1),
  }
  if not args.skip_ws:
    ws = time_ws(args.ws_steps, args.warmup)
    print(f'ws: {ws}', flush=True)
    result.update(ws_step_s=round(ws['step_s'], 3), compiles=ws['compiles'],
                  ws_cache_growth=ws['cache_growth'])
  result.update(loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                cpus=os.cpu_count(), jax=jax.__version__)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
