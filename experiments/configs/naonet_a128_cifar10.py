"""NAONet-A-128 on CIFAR-10: PT-V1 ``train_NAONet_A_128_cifar10_4cards.sh`` (spec §6.5).

  python -m experiments.train_cifar --config=experiments/configs/naonet_a128_cifar10.py \
      --workdir=runs/naonet_a128_c10
  python -m experiments.train_cifar --config=experiments/configs/naonet_a128_cifar10.py:tiny \
      --workdir=/tmp/naonet_a128_tiny

The PyTorch cell string (``NAONet-A-PT``: reduction node 4 inputs swapped), N=6, F=128,
600 epochs of batch 128 (4 GPUs in PT), SGD momentum 0.9, cosine per epoch 0.025 -> 0, weight
decay 5e-4 added after clipping to 5, drop-path keep 0.7 with PT's step + 1, classifier dropout
keep 0.6, auxiliary head 0.4, cutout 16 (PT: centre uniform), evaluation batch 500.
Reported: 1.93 % (README), "about 2.0 +- 0.05" (author, NAO_pytorch#1).
Input normalisation is the seed's per-image standardisation; PT's transform is
``--config.data.normalization=mean_std`` (CIFAR-10 channel constants).
"""

import ml_collections

from experiments.configs import cifar_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return cifar_common.final_config('NAONet-A-PT', arg, data=cifar_common.PT_DATA,
                                   train=cifar_common.PT_TRAIN)
