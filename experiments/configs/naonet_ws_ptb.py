"""NAONet-WS (the NAO-WS cell) on Penn Treebank: final training (spec §6.8, §8.5).

  python -m experiments.train_lm --config=experiments/configs/naonet_ws_ptb.py \
      --workdir=runs/naonet_ws_ptb
  python -m experiments.train_lm --config=experiments/configs/naonet_ws_ptb.py:official \
      --workdir=runs/naonet_ws_ptb_official                 # lr 20, NT-ASGD, L2 8e-7
  python -m experiments.train_lm --config=experiments/configs/naonet_ws_ptb.py:tiny \
      --workdir=/tmp/naonet_ws_ptb_tiny --config.data_dir=../shared/data/ptb   # about a minute

The cell ``0 1 1 1 2 2 1 2 4 1 4 1 4 1 7 1 8 2 1 0 4 1`` (``NAO-WS/rnn/train_final.sh``) read with
the NAO-WS activation ids (0 tanh, 1 relu, 2 sigmoid, 3 identity). Seed recipe (supplementary
material, ENAS setup): SGD lr 10, decayed by 0.9991 after every epoch from epoch 15, clip 0.25,
L2 5e-7, variational dropout, tied weights; the rest from the official code: E = H = 850,
dropouts 0.75 / 0.25 (h) / 0.75 (x) / 0.2 (i) / 0 (e), TAR 1e-3, batch 64, BPTT 35 with the
variable-length sampler, validation batch 10, test batch 1, 4000 epochs (the seed does not
say), seed 1267. Reported: 56.66-56.80 test
perplexity (official recipe, README). Data: ``$NAO_DATA_DIR/ptb`` or ``--config.data_dir``.
Any cell: ``--config.arch= --config.arch_string='0 1 ...' --config.space=rnn_nao`` (or rnn_ws).
"""

import ml_collections

from experiments.configs import lm_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return lm_common.final_config('NAONet-WS-PTB', arg, official_weight_decay=8e-7)
