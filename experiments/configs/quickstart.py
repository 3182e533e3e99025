"""The quickstart: a small NAO-WS search on scikit-learn's handwritten digits (nothing to download).

  python -m experiments.search --config=experiments/configs/quickstart.py --workdir=runs/quickstart

The PT-V1 search of ``nao_ws_cifar10.py`` (the same code: supernet, controller, embedding-space
step, re-ranking) shrunk to run in minutes on a laptop CPU: the 1,797 8x8 digits upsampled to
16x16 RGB (1,500 training images, 300 of them held out as the dev split that scores, 297 test
images never looked at), a supernet of one cell per stage with 8 channels trained 5 epochs per
round, a pool of 24 architectures, 3 rounds of 8 new ones, the best 2 re-ranked by 6 epochs of
stand-alone training. The numbers it prints are a demonstration that the loop runs end to end,
not a search result: digits are easy, and the supernet is tiny.

``:tiny`` is the CI / notebook-test size (seconds of training).
"""

import ml_collections

from experiments.configs import nao_ws_cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = (arg or '').strip()
  if arg not in ('', 'tiny'):
    raise ValueError(f'unknown config variant {arg!r}; choose tiny, or none')
  config = nao_ws_cifar10.get_config()
  if arg == 'tiny':
    nao_ws_cifar10.shrink_to_toy(config)
    config.data.update(source='digits', image_size=8, num_dev=100, train_subset=200)
    config.nao.rerank_top = 1   # one stand-alone compile: the notebook test stays short
    return config
  config.budget = 48            # 24 seed archs + 3 rounds x 8 new
  config.log_every = 8
  config.nao.update(seed_pool_size=24, pool_size=24, top_k=8, num_new=8, eta_max=20.0,
                    eta_chunk=5, rounds=3, rerank_top=2)
  config.controller.update(batch_size=24, epochs=200)
  config.data.update(source='digits', image_size=16, num_dev=300, mean_std_stats='train')
  config.ws_cnn.update(
      supernet=dict(layers=1, channels=8, drop_path_keep=0.9),
      train=dict(batch_size=32, epochs=20, lr_max=0.05, lr_min=0.001),
      epochs_per_round=5, score_batch_size=300, score_capacity=32, log_every=20,
      checkpoint_every_steps=100,
      rerank=dict(layers=1, channels=8, epochs=6, batch_size=32, lr_max=0.05,
                  eval_batch_size=300, use_aux_head=False, log_every_steps=20))
  return config
