"""NAO, random search or regularized evolution on the NAS-Bench-201 table.

  python -m experiments.search --config=experiments/configs/nb201.py --workdir=/tmp/nb201 \
      --config.searcher=nao --config.budget=100 --config.seed=0

The table defaults to ``$NAO_DATA_DIR/nasbench201/nb201_cifar10valid_valid_acc.csv``; set
``--config.table=PATH`` for another CSV with columns ``arch_str,valid_accuracy[,train_seconds]``.
"""

import ml_collections

from nao_jax.controller import config as controller_config
from nao_jax.data import nb201


def get_config():
  config = ml_collections.ConfigDict()
  config.space = 'nb201'
  config.evaluator = 'tabular'
  config.table = nb201.default_table_path() or ''
  config.searcher = 'nao'  # nao | random | evolution
  config.seed = 0
  config.budget = 100
  config.log_every = 10

  # The NAO loop, sized for budgets of 50-300 queries (the PT-V1 defaults are 600/100/300/50):
  # a 20-architecture seed pool, rounds of 10 queries chosen by the predictor among 100 unseen
  # decodes (candidates_per_new=10) of steps eta = 0.5, 1, ... <= 100 from the top 50, every
  # evaluated architecture kept for training, 100 warm controller epochs after the first round,
  # and 200 unlabeled random architectures in every controller training (reconstruction only,
  # as SemiNAS; a deviation from NAO, which trains on the evaluated pool alone). Two of each
  # round's 10 places go to the predictor's favourite one-edit neighbours of the top 50
  # (mutations_per_round, a deviation from NAO's generator: late in a search the embedding step
  # stops reaching the best architectures' one better neighbour; benchmarks/README.md). Two
  # more go to the predictor's favourites among 1000 random unseen architectures that differ
  # from each of the round's 10 best in at least 4 of the 6 edges (screened_per_round, another
  # generator deviation: step and mutations both start from the best architectures, so a
  # search that settled near a local optimum five edits from the best stayed there).
  # Chosen on dev seeds 0-39 (benchmarks/README.md); reported on held-out seeds 100-119,
  # 200-219 and 300-319.
  config.nao = ml_collections.ConfigDict(dict(
      seed_pool_size=20,
      pool_size=0,
      top_k=50,
      num_new=10,
      eta_max=100.0,
      eta_step=0.5,
      eta_chunk=10,
      pool_policy='keep_all',
      num_random=0,
      fill_with_random=True,
      rounds=0,
      exclude='evaluated',
      candidates_per_new=10.0,
      rerank_top=0,
      warm_epochs=100,
      unlabeled=200,
      mutations_per_round=2,
      screened_per_round=2,
      screen_candidates=1000,
      screen_min_edits=4,
  ))
  # nao_jax.controller.ControllerConfig: PT-V1 defaults except where named here. Rank targets
  # (a named deviation, see ControllerConfig) resolve the crowded top of NAS-Bench-201, where
  # min-max targets squeeze the best architectures into the last percent of [0, 1].
  config.controller = ml_collections.ConfigDict(controller_config.config_file_defaults(
      epochs=300,
      target_transform='rank',
  ))
  config.evolution = ml_collections.ConfigDict(dict(population_size=20, sample_size=5))
  return config
