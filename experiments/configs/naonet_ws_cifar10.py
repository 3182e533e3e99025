"""NAONet-WS on CIFAR-10: the TF NAO-WS recipe of ``NAO-WS/cnn/train_final.sh`` (spec §6.5).

  python -m experiments.train_cifar --config=experiments/configs/naonet_ws_cifar10.py \
      --workdir=runs/naonet_ws_c10
  python -m experiments.train_cifar --config=experiments/configs/naonet_ws_cifar10.py:tiny \
      --workdir=/tmp/naonet_ws_tiny

N=5, F=36, 630 epochs of batch 144 (347 steps per epoch), SGD with Nesterov momentum 0.9, SGDR
0.05 -> 1e-4 with T_0 = 10, T_mul = 2 (10 + 20 + 40 + 80 + 160 + 320 = 630 epochs), L2 2e-4 as
``wd * sum w^2`` in the loss (gradient 4e-4 w), drop-path keep 0.6, classifier dropout keep 0.8,
auxiliary head 0.4, no cutout, evaluation batch 100. Reported: 3.50 % (README) / 3.53 % (paper).

Bug-faithful: no gradient clipping (``train.grad_clip=0``): TF-WS computes a clipped gradient
and then applies the unclipped one (spec §9.1 #4); ``--config.train.grad_clip=5`` clips.
Optional cutout: ``--config.data.cutout=16``. TF-WS normalises with the training split's
channel mean/std: ``--config.data.normalization=mean_std --config.data.mean_std_stats=train``;
the default is the seed's per-image standardisation.
"""

import ml_collections

from experiments.configs import cifar_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return cifar_common.final_config(
      'NAONet-WS', arg,
      model=dict(layers=5, channels=36, drop_path_keep=0.6, dropout_keep=0.8),
      data=dict(cutout=0),                # TF-WS default: none
      train=dict(
          epochs=630,
          batch_size=144,
          nesterov=True,
          lr_schedule='sgdr',
          lr_max=0.05,
          lr_min=1e-4,
          weight_decay=2e-4,
          l2_form='sum_sq',               # TF-WS: wd * sum w^2 in the loss
          grad_clip=0.0,                  # bug-faithful: TF-WS's clip is a no-op
          drop_path_step_offset=1,        # TF-WS: r_step = (global_step + 1) / total_steps
      ))
