"""NAONet-B on CIFAR-10: PT-V1 ``train_NAONet_B_36_cifar10.sh`` (spec §6.5).

  python -m experiments.train_cifar --config=experiments/configs/naonet_b_cifar10.py \
      --workdir=runs/naonet_b_c10
  python -m experiments.train_cifar --config=experiments/configs/naonet_b_cifar10.py:tiny \
      --workdir=/tmp/naonet_b_tiny

The PT NAO-WS cell (5-op space), N=6, F=36, 600 epochs of batch 128, SGD momentum 0.9, cosine
per epoch 0.025 -> 0, weight decay 3e-4 added after clipping to 5, drop-path keep 0.8 with PT's
step + 1, classifier dropout keep 0.6, auxiliary head 0.4, cutout 16 (centre uniform),
evaluation batch 500. Reported: 2.93 % (README).
Input normalisation is the seed's per-image standardisation; PT's transform is
``--config.data.normalization=mean_std``.
"""

import ml_collections

from experiments.configs import cifar_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return cifar_common.final_config(
      'NAONet-B', arg,
      model=dict(channels=36, drop_path_keep=0.8),
      data=cifar_common.PT_DATA,
      train=dict(cifar_common.PT_TRAIN, weight_decay=3e-4))
