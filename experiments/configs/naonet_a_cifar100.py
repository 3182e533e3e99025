"""NAONet-A on CIFAR-100: the TF recipe of ``train_cifar100_final.sh`` (spec §6.5, C-100 column).

  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar100.py \
      --workdir=runs/naonet_a_c100
  python -m experiments.train_cifar --config=experiments/configs/naonet_a_cifar100.py:tiny \
      --workdir=/tmp/naonet_a_c100_tiny

As ``naonet_a_cifar10.py`` (N=6, F=128, 600 epochs, batch 128, cosine 0.024 -> 0, L2 5e-4,
clip 5, aux 0.4, cutout 16) except drop-path keep 0.6 and classifier dropout keep 0.8; fine
labels. Reported: 14.80 % test error (README).
"""

import ml_collections

from experiments.configs import cifar_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return cifar_common.final_config(
      'NAONet-A', arg,
      model=dict(drop_path_keep=0.6, dropout_keep=0.8),
      data=dict(name='cifar100', mean_std_stats='train'))  # no published CIFAR-100 constants
