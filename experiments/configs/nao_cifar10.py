"""NAO without weight sharing on CIFAR-10: candidates trained from scratch (TF-NAO-CNN, spec §4.4).

  python -m experiments.search --config=experiments/configs/nao_cifar10.py \
      --workdir=runs/nao_cifar10                            # weeks of GPU time, as in the paper
  python -m experiments.search --config=experiments/configs/nao_cifar10.py:tiny \
      --workdir=/tmp/nao_tiny                               # every code path, synthetic images

TF-NAO's loop in the 11-op space: 1000 random architectures, each trained 25 epochs from
scratch (``nao_jax.cnn.scratch_evaluator``, recipe ``TF_NAO_SEARCH_RECIPE``) and scored by its
best per-epoch dev accuracy on the 5k split held out of CIFAR-10's 50k; the controller (TF-NAO
sizes: token embedding 32 x 3 tokens per step, no MLP layer, Bahdanau attention, uniform init,
L2 in the loss, batch 50, 1000 epochs, fresh each round, error targets) proposes up to 300 new
architectures from the top 100 with eta = 10, 20, 30; 2 rounds ("normally 2 or 3").
Finished candidates are never trained again: rerunning the command after a kill resumes.

Named deviations: ``nao.exclude='evaluated'`` and de-duplication (TF-NAO's ``generate.sh``
does none, spec §4.2), the decoder's (type, size)-valid mask (TF can emit invalid op pairs,
spec §3.4), the PT macro-structure of the candidate network (see ``scratch_evaluator``).
"""

import ml_collections

from nao_jax.controller import config as controller_config
from nao_jax.data import search_split


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.space = 'cnn_nao'
  config.evaluator = 'scratch_cnn'
  config.searcher = 'nao'
  config.seed = 0
  config.budget = 1600          # 1000 seed archs + 2 rounds x 300 new
  config.log_every = 10
  config.draw = True

  config.nao = ml_collections.ConfigDict(dict(
      seed_pool_size=1000,
      pool_size=0,
      top_k=100,
      num_new=300,
      eta_max=30.0,
      eta_step=10.0,            # three step sizes, 10, 20, 30
      eta_chunk=3,
      pool_policy='keep_all',   # TF-NAO retrains the controller on every evaluated arch
      num_random=0,
      fill_with_random=False,
      rounds=2,
      exclude='evaluated',
      candidates_per_new=1.0,
      rerank_top=0,
      warm_epochs=0,
  ))
  config.controller = ml_collections.ConfigDict(controller_config.config_file_defaults(
      hidden_size=96,
      tokens_per_step=3,
      emb_size=32,
      mlp_layers=0,
      mlp_dropout=0.0,
      encoder_dropout=0.1,
      encoder_dropout_on='outputs',
      attention='bahdanau',
      init='uniform',
      forget_bias=1.0,
      l2_mode='loss',
      batch_size=50,
      epochs=1000,
      swap_augment=False,
      warm_start=False,         # a separate run per iteration
      target_orientation='error',
      target_transform='minmax',
  ))
  config.data = ml_collections.ConfigDict(dict(search_split.DATA_DEFAULTS))
  # nao_jax.cnn.scratch_evaluator: ``train`` overrides TF_NAO_SEARCH_RECIPE's fields
  # (standalone.StandaloneConfig); ``devices``: 0 = every local device, one candidate each.
  config.scratch_cnn = ml_collections.ConfigDict(dict(train={}, devices=0))

  arg = (arg or '').strip()
  if arg not in ('', 'tiny'):
    raise ValueError(f'unknown config variant {arg!r}; choose tiny, or none')
  if arg == 'tiny':
    # 6 archs, 1 round of 2 new ones, candidates of 1 cell per stage and 4 channels trained one
    # epoch on 64 synthetic 8x8 images.
    config.budget = 8
    config.log_every = 2
    config.nao.update(seed_pool_size=6, top_k=3, num_new=2, eta_chunk=3, rounds=1)
    config.controller.update(hidden_size=12, emb_size=4, batch_size=6, epochs=10)
    config.data.update(source='synthetic', image_size=8, synthetic_train=96, num_dev=32,
                       mean_std_stats='train')
    config.scratch_cnn.train = dict(layers=1, channels=4, epochs=2, batch_size=32,
                                    eval_batch_size=32, use_aux_head=False, log_every_steps=2)
  return config
