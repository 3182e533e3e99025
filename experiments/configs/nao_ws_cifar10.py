"""NAO-WS on CIFAR-10: the weight-sharing CNN search of PT-V1 (spec §4.2-§4.3, §5.1-§5.2, §11.4).

  python -m experiments.search --config=experiments/configs/nao_ws_cifar10.py \
      --workdir=runs/nao_ws_cifar10                         # CIFAR-10 from $NAO_DATA_DIR or tfds
  python -m experiments.search --config=experiments/configs/nao_ws_cifar10.py:tiny \
      --workdir=/tmp/nao_ws_tiny                            # every code path, synthetic images

600 random architectures of the 5-op space seed the pool. A supernet (N=3, C=20, drop-path keep
0.9; one uniformly drawn pool architecture per step, batch 64, SGD 0.025 -> 0.001 cosine over
150 epochs) trains 30 epochs before each of 5 scorings; every pool architecture is scored by
its accuracy on 500 dev images with the shared weights (BN batch statistics). Between scorings
the controller (PT-V1: 1000 epochs, fresh Adam, warm weights) proposes up to 300 new
architectures from the top 100 with eta = 1, 2, ... <= 50, and the pool keeps its best
600 - new plus the new ones (4 rounds). The top 5 of the last scoring are then trained
stand-alone 10 epochs (N=3, C=20) and scored on the 5k dev split; the best is the result
(``runs/.../results.json``, drawn as ``best_arch_*.svg``). Train it with
``python -m experiments.train_cifar --config=experiments/configs/naonet_ws_cifar10.py
--config.arch_string='...'``.

Named deviation from PT-V1 (see ``nao_jax/cnn/ws_evaluator.py``): ``ws_cnn.score_batches =
'fixed'`` (PT-V1: ``'random'``, a fresh random dev batch per architecture, which adds batch noise
to every comparison; set it back to reproduce PT-V1 exactly), ``nao.exclude='evaluated'``
(official: ``'pool'``).
"""

import ml_collections

from nao_jax.controller import config as controller_config
from nao_jax.data import search_split


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.space = 'cnn_ws'
  config.evaluator = 'ws_cnn'
  config.searcher = 'nao'
  config.seed = 0
  config.budget = 1800          # 600 seed archs + 4 rounds x 300 new
  config.log_every = 100
  config.draw = True

  config.nao = ml_collections.ConfigDict(dict(
      seed_pool_size=600,
      pool_size=600,
      top_k=100,
      num_new=300,
      eta_max=50.0,
      eta_step=1.0,
      eta_chunk=5,
      pool_policy='replace_worst',
      num_random=0,
      fill_with_random=False,   # PT-V1: a round that decodes fewer new archs adds fewer
      rounds=4,
      exclude='evaluated',
      candidates_per_new=1.0,
      rerank_top=5,
      warm_epochs=0,
  ))
  # PT-V1's controller (NAO_V1/train_search.py): the ControllerConfig defaults.
  config.controller = ml_collections.ConfigDict(controller_config.config_file_defaults())

  # Where the images come from: CIFAR-10's 50k training images, 5k held out as the dev split.
  config.data = ml_collections.ConfigDict(dict(search_split.DATA_DEFAULTS))

  # nao_jax.cnn.ws_evaluator: supernet (SupernetConfig), recipe (TrainConfig), scoring, and the
  # finalists' stand-alone re-ranking (standalone.StandaloneConfig; PT-V1: 10 epochs N=3 C=20).
  config.ws_cnn = ml_collections.ConfigDict(dict(
      supernet=dict(layers=3, channels=20, drop_path_keep=0.9, dropout_keep=1.0),
      train=dict(batch_size=64, epochs=150, lr_max=0.025, lr_min=0.001, weight_decay=3e-4,
                 clip_norm=5.0),
      epochs_per_round=30,
      score_batch_size=500,
      score_batches='fixed',
      score_capacity=1024,
      log_every=100,
      checkpoint_every_steps=500,
      data_parallel=True,
      rerank=dict(layers=3, channels=20, epochs=10, batch_size=64, lr_max=0.025, lr_min=0.001,
                  drop_path_keep=0.8, dropout_keep=0.6, use_aux_head=True, score='last'),
  ))

  arg = (arg or '').strip()
  if arg not in ('', 'tiny'):
    raise ValueError(f'unknown config variant {arg!r}; choose tiny, or none')
  if arg == 'tiny':
    shrink_to_toy(config)
  return config


def shrink_to_toy(config: ml_collections.ConfigDict) -> None:
  """Every code path at toy size (tests, CI): 8 archs, 2 rounds, a 1-cell-per-stage supernet of
  4 channels on 96 synthetic 8x8 images, one supernet epoch per round, re-ranking 2 finalists."""
  config.budget = 16
  config.log_every = 4
  config.nao.update(seed_pool_size=8, pool_size=8, top_k=4, num_new=4, eta_max=6.0,
                    eta_chunk=3, rounds=2, rerank_top=2)
  config.controller.update(hidden_size=16, mlp_layers=1, mlp_hidden=16, batch_size=20,
                           epochs=15)
  config.data.update(source='synthetic', image_size=8, synthetic_train=96, num_dev=32,
                     mean_std_stats='train')
  config.ws_cnn.update(
      supernet=dict(layers=1, channels=4, drop_path_keep=0.9), epochs_per_round=1,
      train=dict(batch_size=16, epochs=3), score_batch_size=32, score_capacity=16, log_every=2,
      checkpoint_every_steps=3,
      rerank=dict(layers=1, channels=4, epochs=1, batch_size=16, eval_batch_size=32,
                  use_aux_head=False, log_every_steps=2))
