"""FLOP counting for the benchmarks' utilisation figures (no side effects on import).

``matmul_flops_per_s`` measures what the device does on the friendliest dense workload (a large
float32 matmul); ``jaxpr_flops`` counts a program's model FLOPs (its convolutions and matrix
products, 2 per multiply-add) from its jaxpr. Their ratio, measured in one run, is the ``mfu``
the benchmarks print.
"""

from __future__ import annotations

import math
import time

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp


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


def _eqn_flops(eqn) -> int:
  if eqn.primitive.name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features, spatial...)
    per_output = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])  # in features per group
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
  if eqn.primitive.name == 'dot_general':
    (contracting, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
  return 0


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of the convolutions and dot products of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``).

  Nested programs (jit, scan bodies times their length, cond branches: every branch counted,
  custom derivatives' primal bodies) are included. Elementwise work, reductions and data movement
  are not: this is the "model FLOPs" numerator of an MFU.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
          total += repeat * jaxpr_flops(sub)
  return total
