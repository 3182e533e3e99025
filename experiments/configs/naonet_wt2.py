"""NAONet (the NAO PTB cell) on WikiText-2 (spec §6.8).

  python -m experiments.train_lm --config=experiments/configs/naonet_wt2.py \
      --workdir=runs/naonet_wt2
  python -m experiments.train_lm --config=experiments/configs/naonet_wt2.py:official \
      --workdir=runs/naonet_wt2_official                    # lr 20, NT-ASGD, L2 5e-7
  python -m experiments.train_lm --config=experiments/configs/naonet_wt2.py:tiny \
      --workdir=/tmp/naonet_wt2_tiny --config.data_dir=../shared/data/wikitext2

The cell ``0 1 0 1 1 1 3 0 4 1 4 1 5 1 1 1 7 1 1 1 1 2`` read with the NAO activation ids (0 tanh,
1 relu, 2 identity, 3 sigmoid). Seed recipe (supplementary material, ENAS setup): SGD lr 10,
decayed by 0.9991 after every epoch from epoch 15, clip 0.25, L2 5e-7, variational dropout, tied
weights; for WikiText-2 the seed sets E = H = 700, L2 5e-7 and variational dropout 0.15 (read
as dropouth, as ``NAO/rnn/train_wt2_final.sh``); the rest from the official code: dropouts 0.75 /
0.75 (x) / 0.2 (i) / 0 (e), TAR 1e-3, batch 64, BPTT 35 with the variable-length sampler,
validation batch 10, test batch 1, 2000 epochs, seed 1267. Reported: 67.10 test perplexity
(official recipe, README). Data: ``$NAO_DATA_DIR/wikitext2`` or ``--config.data_dir``.
Any cell: ``--config.arch= --config.arch_string='0 1 ...' --config.space=rnn_nao`` (or rnn_ws).
"""

import ml_collections

from experiments.configs import lm_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 1267
  config.arch = 'NAONet-PTB'
  config.arch_string = ''
  config.space = ''
  config.dataset = 'wikitext2'
  config.data_dir = ''
  config.train_tokens = 0
  config.model = ml_collections.ConfigDict(dict(
      emb_size=700,
      hidden_size=700,
      dropout=0.75,
      dropouth=0.15,
      dropoutx=0.75,
      dropouti=0.2,
      dropoute=0.0,
      init_range=0.04,
      output_average='exclude_s0',
      fuse=True,
  ))
  config.train = ml_collections.ConfigDict(dict(
      epochs=2000,
      batch_size=64,
      eval_batch_size=10,
      test_batch_size=1,
      bptt=35,
      schedule='exp_decay',
      lr=10.0,
      lr_decay=0.9991,
      lr_decay_start_epoch=15,
      nonmono=5,
      clip=0.25,
      weight_decay=5e-7,
      tar_beta=1e-3,
      ar_alpha=0.0,
      seq_p_full=0.95,
      seq_std=5.0,
      seq_min_len=5,
      seq_max_delta=20,
      pad_multiple=5,
      max_steps=0,
      max_rollbacks=3,
      rollback_to='last',
  ))
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  config.evaluate_test = True
  return lm_common.apply_variant(config, arg, official_weight_decay=5e-7)
