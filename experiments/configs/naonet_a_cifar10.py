"""NAONet-A on CIFAR-10: the paper's NAONet, seed recipe (TF ``train_cifar10_final.sh``, spec §6.5).

  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar10.py \
      --workdir=runs/naonet_a_c10
  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar10.py:tiny \
      --workdir=/tmp/naonet_a_tiny

N=6, F=128, 600 epochs of batch 128, SGD momentum 0.9, cosine per epoch 0.024 -> 0, L2 5e-4
(TF: in the loss, hence clipped with the gradient), clip 5, drop-path keep 0.7, classifier
dropout keep 0.6, auxiliary head 0.4, cutout 16, per-image standardisation ("whitening"),
TF-style cutout (corner uniform). Reported: 2.10 % (README) / 2.11 % (paper) test error.
The cell is the TF reduction cell (``NAONet-A``); the network structure follows PT-V1 (project
default); the TF structure is ``--config.model.relu_before_gap=True
--config.model.avg_pool_exclude_pad=True --config.model.aux_head_tf_position=True
--config.model.drop_path_identity=False``.
"""

import ml_collections

from experiments.configs import cifar_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return cifar_common.final_config('NAONet-A', arg)
