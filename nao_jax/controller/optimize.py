"""The embedding-space step that turns good architectures into new ones (spec §4).

For each seed (the top-K of the pool): encode to the normalised per-step outputs ``h_t``, take
``G_t = d(sum f)/d h_t`` through pooling, normalisation and the predictor, move
``h'_t = l2norm(h_t + direction * eta * G_t)``, re-pool ``e' = l2norm(mean h'_t)`` and decode
greedily from ``(e', e')`` attending over ``h'``. ``eta`` is a single step from the original
embedding, increased 1, 2, ... until enough unseen architectures appear (PT-V1: 300 new from the
top 100, eta <= 50). One compiled program handles a chunk of step sizes for all seeds at once;
the host scans the results in the official order (eta ascending, then seed rank) and keeps the
first architectures whose canonical key is neither in the pool nor already proposed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Hashable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nao_jax.controller.config import ControllerConfig
from nao_jax.controller.model import Controller, l2_normalize
from nao_jax.spaces.base import SearchSpace

Array = jax.Array


@functools.partial(jax.jit, static_argnames=('cfg',))
def decode_moved(params, cfg: ControllerConfig, seeds: Array, etas: Array, direction: Array,
                 mask_table: Array) -> Array:
  """Decodes every seed moved by every step size.

  Args:
    params: controller parameters.
    cfg: static controller config.
    seeds: ``int32[K, L]`` seed token sequences.
    etas: ``float32[E]`` step sizes.
    direction: float32 scalar, +1 to increase the predicted score, -1 to decrease it.
    mask_table: ``bool[L, V, V]`` decoder masks of the space.

  Returns:
    ``int32[E, K, L]`` decoded tokens.
  """
  model = Controller(cfg)
  variables = {'params': params}
  memory, _ = model.apply(variables, seeds, method=Controller.encode)
  predict = lambda m: model.apply(variables, m, method=Controller.predict_from_memory).sum()
  grad = jax.grad(predict)(memory)

  # All (eta, seed) pairs decode as one batch: larger matmuls than a loop over eta.
  moved = l2_normalize(memory[None] + direction * etas[:, None, None, None] * grad[None])
  moved = moved.reshape((-1,) + memory.shape[1:])
  tokens = model.apply(variables, moved, Controller.pool(moved), mask_table,
                       method=Controller.decode_greedy)
  return tokens.reshape(etas.shape[0], seeds.shape[0], -1)


@dataclasses.dataclass
class Proposal:
  """Result of one proposal round.

  Attributes:
    archs: ``int32[n, *arch_shape]`` new, valid, unseen architectures (n <= num_new).
    etas: ``float[n]`` step size that produced each one.
    seed_index: ``int[n]`` row of the seed (in the order given) it came from.
    max_eta: the largest step size tried.
  """
  archs: np.ndarray
  etas: np.ndarray
  seed_index: np.ndarray
  max_eta: float


def propose(params, cfg: ControllerConfig, space: SearchSpace, seed_archs: np.ndarray,
            seen_keys: Iterable[Hashable], num_new: int, eta_max: float, direction: int,
            eta_step: float = 1.0, eta_chunk: int = 5, seed_capacity: int | None = None,
            ) -> Proposal:
  """Proposes up to ``num_new`` unseen architectures from ``seed_archs`` (best first).

  Args:
    params: trained controller parameters.
    cfg: controller config.
    space: the search space (tokens, masks, canonical keys, validation).
    seed_archs: ``int[K, *arch_shape]`` seeds ordered best first.
    seen_keys: canonical keys of architectures that must not be proposed (the pool).
    num_new: how many new architectures to return at most.
    eta_max: largest step size; step sizes are ``eta_step, 2*eta_step, ... <= eta_max``.
    direction: +1 when larger predicted scores are better, -1 otherwise.
    eta_step: increment of the step size.
    eta_chunk: step sizes decoded per compiled call (a fixed shape: one compilation).
    seed_capacity: pad the seeds to this many rows so that calls with fewer seeds reuse the
      compilation (defaults to ``len(seed_archs)``).

  Raises:
    ValueError: no seeds, a non-positive quota or step, or a direction other than +-1.
  """
  seed_archs = np.asarray(seed_archs, np.int32)
  if seed_archs.ndim != 1 + len(space.arch_shape) or len(seed_archs) == 0:
    raise ValueError(f'seed_archs must be a non-empty batch of architectures of shape '
                     f'{space.arch_shape}, got shape {seed_archs.shape}')
  if num_new < 1 or eta_max <= 0 or eta_step <= 0 or eta_chunk < 1:
    raise ValueError(f'need num_new >= 1, eta_max > 0, eta_step > 0, eta_chunk >= 1; got '
                     f'{num_new}, {eta_max}, {eta_step}, {eta_chunk}')
  if direction not in (1, -1):
    raise ValueError(f'direction must be +1 or -1, got {direction}')
  num_seeds = len(seed_archs)
  capacity = max(seed_capacity or num_seeds, num_seeds)
  tokens = space.to_tokens(seed_archs)
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], capacity - num_seeds, axis=0)])
  mask_table = jnp.asarray(space.decoder_mask_table())
  seen = set(seen_keys)
  rejected = set()
  archs, etas, seeds = [], [], []
  all_etas = np.arange(1, int(np.floor(eta_max / eta_step + 1e-9)) + 1) * eta_step
  for start in range(0, len(all_etas), eta_chunk):
    chunk = all_etas[start:start + eta_chunk]
    padded = np.concatenate([chunk, np.full(eta_chunk - len(chunk), chunk[-1])])
    decoded = np.asarray(decode_moved(params, cfg, jnp.asarray(tokens), jnp.asarray(padded, jnp.float32),
                                      jnp.float32(direction), mask_table))
    for e, eta in enumerate(chunk):
      for k in range(num_seeds):
        row = decoded[e, k].tobytes()
        if row in rejected:  # most decodes repeat one seen before: skip parsing them again
          continue
        rejected.add(row)
        arch = space.from_tokens(decoded[e, k])
        key = space.canonical_key(arch)
        if key in seen:
          continue
        seen.add(key)
        archs.append(arch)
        etas.append(eta)
        seeds.append(k)
        if len(archs) == num_new:
          return Proposal(np.stack(archs), np.asarray(etas), np.asarray(seeds), float(eta))
  return Proposal(np.stack(archs) if archs else np.zeros((0,) + space.arch_shape, np.int32),
                  np.asarray(etas), np.asarray(seeds), float(all_etas[-1]) if len(all_etas) else 0.0)
