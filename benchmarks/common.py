"""Shared helpers of the benchmarks: the matmul peak and the JSON result line."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nao_jax import host_memory

# Every benchmark runs with freed host memory kept for reuse, as the launchers do by default.
KEEP_HOST_MEMORY = host_memory.keep_freed_memory()


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large float32 matmul on the default device (best of ``repeats``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def machine() -> dict:
  """What the figures were measured on."""
  return {'device': str(jax.devices()[0].device_kind), 'backend': jax.default_backend(),
          'cpu_count': os.cpu_count(), 'load_avg_1m': round(os.getloadavg()[0], 2),
          'jax': jax.__version__, 'keep_host_memory': KEEP_HOST_MEMORY}


def emit(results: dict) -> None:
  """Prints the results as one JSON object on the last line."""
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()},
                   default=lambda v: np.asarray(v).tolist()))
