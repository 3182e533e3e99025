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
  return lm_common.final_config('NAONet-PTB', arg, official_weight_decay=5e-7,
                                dataset='wikitext2',
                                model=dict(emb_size=700, hidden_size=700, dropouth=0.15),
                                train=dict(epochs=2000))
