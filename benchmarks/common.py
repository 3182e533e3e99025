"""Shared helpers of the benchmarks: the matmul peak (``benchmarks.flops``), the machine and the
JSON result line."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from benchmarks.flops import matmul_flops_per_s  # pylint: disable=unused-import
from nao_jax import host_memory

# Every benchmark runs with freed host memory kept for reuse, as the launchers do by default.
KEEP_HOST_MEMORY = host_memory.keep_freed_memory()


def machine() -> dict:
  """What the figures were measured on."""
  return {'device': str(jax.devices()[0].device_kind), 'backend': jax.default_backend(),
          'cpu_count': os.cpu_count(), 'load_avg_1m': round(os.getloadavg()[0], 2),
          'jax': jax.__version__, 'keep_host_memory': KEEP_HOST_MEMORY}


def emit(results: dict) -> None:
  """Prints the results as one JSON object on the last line."""
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()},
                   default=lambda v: np.asarray(v).tolist()))
