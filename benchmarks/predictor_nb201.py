"""How well the controller's predictor ranks NAS-Bench-201 cells it has not seen.

  python -m benchmarks.predictor_nb201 --data_dir=../shared/data [--seeds=3]

Per seed: 1000 random cells train the controller (the controller section of
``experiments/configs/nb201.py``, with ``--epochs``), 2000 other random cells test it.
Keys (means over seeds): ``pairwise_acc`` and ``kendall_tau`` of predicted vs true validation
accuracy on the test cells, ``reconstruction_acc`` (fraction of training cells whose greedy
masked decoding reproduces them exactly), plus per-seed values. Targets: pairwise_acc >= 0.85,
reconstruction_acc >= 0.99 (the paper's controller: 0.78-0.80 pairwise accuracy on its CIFAR data).
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from experiments.configs import nb201 as nb201_config
from nao_jax import metrics, spaces
from nao_jax.controller import (ControllerConfig, capacity_for, init_controller,
                                normalize_targets, pad_pool, predict_in_chunks, reconstruct,
                                train_epochs)
from nao_jax.data import nb201 as nb201_data

_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('NAO_DATA_DIR'), 'Shared data root.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds.')
_EPOCHS = flags.DEFINE_integer('epochs', 1000, 'Controller epochs.')
_TRAIN = flags.DEFINE_integer('train', 1000, 'Training cells.')
_TEST = flags.DEFINE_integer('test', 2000, 'Test cells.')
_CONTROLLER = flags.DEFINE_string('controller_overrides', '{}', 'JSON controller overrides.')


def run_seed(table, space, cfg, seed):
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(table.archs))
  train, test = order[:_TRAIN.value], order[_TRAIN.value:_TRAIN.value + _TEST.value]
  targets, _ = normalize_targets(table.accuracy[train], True, cfg.target_orientation,
                                 cfg.target_transform)
  tokens = space.to_tokens(table.archs[train])
  padded = pad_pool(tokens, targets, capacity_for(len(train), cfg.batch_size))
  state = init_controller(cfg, jax.random.key(seed))
  start = time.perf_counter()
  state, _ = train_epochs(state, cfg, *padded, jnp.asarray(space.swap_permutations()),
                          jnp.int32(cfg.epochs), jax.random.key(seed + 1000))
  jax.block_until_ready(state)
  train_s = time.perf_counter() - start
  predicted = predict_in_chunks(state.params, cfg, space.to_tokens(table.archs[test]))
  decoded = np.concatenate([
      np.asarray(reconstruct(state.params, cfg, jnp.asarray(tokens[i:i + 500]),
                             jnp.asarray(space.decoder_mask_table())))
      for i in range(0, len(tokens), 500)])
  return {'pairwise_acc': metrics.pairwise_accuracy(table.accuracy[test], predicted),
          'kendall_tau': metrics.kendall_tau(table.accuracy[test], predicted),
          'reconstruction_acc': metrics.reconstruction_accuracy(tokens, decoded),
          'train_s': train_s}


def main(argv):
  del argv
  table = nb201_data.load_table(nb201_data.default_table_path(_DATA_DIR.value))
  space = spaces.NB201_SPACE
  values = nb201_config.get_config().controller.to_dict()
  values.update(epochs=_EPOCHS.value, **json.loads(_CONTROLLER.value))
  cfg = ControllerConfig.for_space(space, **values)
  per_seed = [run_seed(table, space, cfg, seed) for seed in range(_SEEDS.value)]
  results = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
  results.update({f'{key}_per_seed': [round(r[key], 4) for r in per_seed] for key in
                  ('pairwise_acc', 'kendall_tau', 'reconstruction_acc')})
  common.emit({**results, 'seeds': _SEEDS.value, 'train_cells': _TRAIN.value,
               'test_cells': _TEST.value, 'controller_config': values, **common.machine()})


if __name__ == '__main__':
  app.run(main)
