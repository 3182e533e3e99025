"""NAO-WS on Penn Treebank: the WS-RNN search (spec §3.1 WS-RNN, §4.2, §4.3, §5.3, §5.4).

  python -m experiments.search --config=experiments/configs/nao_ws_ptb.py --workdir=runs/nao_ws_ptb
  python -m experiments.search --config=experiments/configs/nao_ws_ptb.py:tiny \
      --workdir=/tmp/nao_ws_ptb_tiny --config.ws_rnn.data_dir=../shared/data/ptb   # 1-2 minutes

A supernet LM (E = H = 300, batch 256, SGD 0.25) trains 200 epochs before each of 5 scorings of
the pool (1000 epochs in all); every architecture of the pool is scored by its mean validation
NLL on a fixed window with the shared weights (lower is better); between scorings the
controller (trained on the pool, warm-started with its Adam state) proposes up to 300 new
architectures from the top 100 with eta = 1, 2, ... <= 30, and the pool keeps its best
1000 - new - 50, the new ones and 50 fresh random ones (4 rounds). The found cell (the ``rnn_ws``
string, NAO-WS activation ids) trains with
``python -m experiments.train_lm --config=experiments/configs/naonet_ws_ptb.py
--config.arch= --config.arch_string='...' --config.space=rnn_ws``.

Named deviations from the official code (see ``nao_jax/rnn/ws_evaluator.py``):
``ws_rnn.score_window='fixed'`` (official: ``'reference'``, a near-constant random row, spec §9.1
#16), ``ws_rnn.output_average='exclude_s0'`` (official supernet: ``'include_s0'``),
``nao.exclude='evaluated'`` (official: ``'pool'``). Not reproduced: the WS-RNN predictor's
uniform(+-0.04) init (PyTorch defaults here).
"""

import ml_collections

from nao_jax.controller import config as controller_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.space = 'rnn_ws'
  config.evaluator = 'ws_rnn'
  config.searcher = 'nao'
  config.seed = 0
  config.budget = 2400          # 1000 seed archs + 4 rounds x (300 new + 50 random)
  config.log_every = 100
  config.draw = True

  config.nao = ml_collections.ConfigDict(dict(
      seed_pool_size=1000,
      pool_size=1000,
      top_k=100,
      num_new=300,
      eta_max=30.0,
      eta_step=1.0,
      eta_chunk=5,
      pool_policy='replace_worst_with_random',
      num_random=50,
      fill_with_random=False,   # official: a round that decodes fewer new archs adds fewer
      rounds=4,
      exclude='evaluated',
      candidates_per_new=1.0,
      rerank_top=0,             # no stand-alone re-ranking for RNN cells
      warm_epochs=0,
  ))

  # The WS-RNN controller (NAO-WS/rnn/train_search.sh): emb 48 x 2 tokens per step = 96, dropout
  # 0.1 on the token embeddings, predictor 4 x 200 without dropout, Luong attention, Adam 1e-3
  # with weight decay 1e-4, clip 5, batch 100, 1000 epochs per round, warm start incl. Adam.
  config.controller = ml_collections.ConfigDict(controller_config.config_file_defaults(
      hidden_size=96,
      mlp_layers=4,
      mlp_hidden=200,
      mlp_dropout=0.0,
      encoder_dropout=0.1,
      encoder_dropout_on='embeddings',
      decoder_dropout=0.0,
      attention='luong',
      trade_off=0.8,
      lr=1e-3,
      l2=1e-4,
      l2_mode='adam_coupled',
      grad_clip=5.0,
      batch_size=100,
      epochs=1000,
      swap_augment=False,
      warm_start=True,
      keep_optimizer_state=True,
      target_orientation='native',   # valid NLL, lower is better: step along -grad
      target_transform='minmax',
  ))

  # nao_jax.rnn.ws_evaluator.WsRnnConfig: the WS-RNN supernet (spec §5.3).
  config.ws_rnn = ml_collections.ConfigDict(dict(
      data_dir='',              # '' = $NAO_DATA_DIR/ptb
      dataset='ptb',
      train_tokens=0,
      valid_tokens=0,
      emb_size=300,
      hidden_size=300,
      dropout=0.75,
      dropouth=0.25,
      dropoutx=0.75,
      dropouti=0.2,
      dropoute=0.0,
      init_range=0.04,
      output_average='exclude_s0',
      lr=0.25,
      clip=10.0,
      weight_decay=5e-7,
      tar_beta=1e-3,
      ar_alpha=0.0,
      batch_size=256,
      bptt=35,
      seq_p_full=0.95,
      seq_std=0.0,
      seq_min_len=5,
      seq_max_delta=20,
      pad_multiple=5,
      epochs_per_round=200,
      reset_hidden_on_arch_change=False,
      score_window='fixed',
      score_num_windows=1,
      score_batch_size=256,
      score_capacity=1024,
      checkpoint_every_steps=500,
      log_every_steps=100,
      seed=0,
  ))

  arg = (arg or '').strip()
  if arg not in ('', 'tiny', 'runlocal'):
    raise ValueError(f'unknown config variant {arg!r}; choose tiny (or runlocal), or none')
  if arg:
    # Every code path at toy size: 8 archs, 2 proposal rounds, a 16-unit supernet on the first
    # 4,000 PTB tokens, one supernet epoch per round, a small controller.
    config.budget = 20
    config.log_every = 5
    config.nao.update(seed_pool_size=8, pool_size=8, top_k=4, num_new=4, num_random=2,
                      eta_max=6.0, eta_chunk=3, rounds=2)
    config.controller.update(hidden_size=16, mlp_layers=1, mlp_hidden=16, batch_size=20,
                             epochs=15)
    config.ws_rnn.update(train_tokens=4000, valid_tokens=2000, emb_size=16, hidden_size=16,
                         batch_size=8, bptt=10, pad_multiple=10, score_batch_size=8,
                         score_capacity=16,
                         epochs_per_round=1, checkpoint_every_steps=20, log_every_steps=10)
  return config
