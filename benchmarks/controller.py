"""Controller speed: 1000 epochs on 600 random 5-op architectures, then 300 proposals.

  python -m benchmarks.controller [--epochs=1000]

Keys: ``train_1000_epochs_s`` (wall time of the 1000 epochs, compilation excluded; with
``--epochs`` smaller it is extrapolated and ``epochs_measured`` says so), ``propose_300_s``
(300 new architectures from the top 100, eta = 1, 2, ... <= 50, compilation excluded),
``compile_s``, ``step_gflop`` (analytic model FLOPs of one training step, forward + backward),
``mfu`` (model FLOP/s over the FLOP/s of a 2048^3 float32 matmul measured in the same run).
Reference: the official PyTorch controller needs 2,220 s for the 1000 epochs on a 2-core CPU.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from nao_jax import spaces
from nao_jax.controller import (ControllerConfig, capacity_for, init_controller,
                                normalize_targets, pad_pool, propose, train_epochs)

_EPOCHS = flags.DEFINE_integer('epochs', 1000, 'Epochs to time (1000 = the reference run).')
_POOL = flags.DEFINE_integer('pool', 600, 'Architectures in the pool.')


def train_step_flops(cfg: ControllerConfig, batch: int) -> float:
  """Analytic matmul FLOPs of one training step (forward x 3 for forward + backward)."""
  h, v = cfg.hidden_size, cfg.vocab_size
  t_enc, t_dec = cfg.encoder_length, cfg.source_length
  lstm = lambda steps, inp: steps * 2 * (inp + h) * 4 * h  # input + recurrent projections
  encoder = lstm(t_enc, cfg.tokens_per_step * cfg.emb_size)
  decoder = lstm(t_dec, h) + t_dec * (2 * h * h            # query projection
                                      + 2 * 2 * t_enc * h  # scores and mix
                                      + 2 * 2 * h * h      # tanh(W [mix; o])
                                      + 2 * h * v)         # output layer
  mlp, fan_in = 0, h
  for _ in range(cfg.mlp_layers):
    mlp += 2 * fan_in * cfg.mlp_hidden
    fan_in = cfg.mlp_hidden
  mlp += 2 * fan_in
  return 3.0 * batch * (encoder + decoder + mlp)


def main(argv):
  del argv
  space = spaces.WS_SPACE
  cfg = ControllerConfig.for_space(space)
  rng = np.random.default_rng(0)
  archs = space.sample(rng, _POOL.value)
  targets, direction = normalize_targets(rng.random(_POOL.value), higher_is_better=True)
  tokens, targets, valid = pad_pool(space.to_tokens(archs), targets,
                                    capacity_for(_POOL.value, cfg.batch_size))
  swaps = jnp.asarray(space.swap_permutations())
  state = init_controller(cfg, jax.random.key(0))
  steps_per_epoch = capacity_for(_POOL.value, cfg.batch_size) // cfg.batch_size

  start = time.perf_counter()
  compiled = train_epochs.lower(state, cfg, tokens, targets, valid, swaps, jnp.int32(1),
                                jax.random.key(1)).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, tokens, targets, valid, swaps, jnp.int32(1), jax.random.key(1))
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, stats = compiled(state, tokens, targets, valid, swaps, jnp.int32(_EPOCHS.value),
                          jax.random.key(2))
  jax.block_until_ready(state)
  train_s = time.perf_counter() - start

  seen = {space.canonical_key(a) for a in archs}
  propose(state.params, cfg, space, archs[:100], seen, 300, 50.0, direction)  # compile
  start = time.perf_counter()
  proposal = propose(state.params, cfg, space, archs[:100], seen, 300, 50.0, direction)
  propose_s = time.perf_counter() - start

  peak = common.matmul_flops_per_s()
  flops = train_step_flops(cfg, cfg.batch_size)
  step_s = train_s / (_EPOCHS.value * steps_per_epoch)
  common.emit({
      'train_1000_epochs_s': train_s * 1000 / _EPOCHS.value,
      'epochs_measured': _EPOCHS.value,
      'propose_300_s': propose_s,
      'proposed': len(proposal.archs),
      'max_eta': proposal.max_eta,
      'compile_s': compile_s,
      'step_ms': 1000 * step_s,
      'step_gflop': flops / 1e9,
      'model_gflop_per_s': flops / step_s / 1e9,
      'matmul_gflop_per_s': peak / 1e9,
      'mfu': flops / step_s / peak,
      'final_loss': float(stats['loss']),
      **common.machine(),
  })


if __name__ == '__main__':
  app.run(main)
