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
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.arch = 'NAONet-WS'
  config.arch_string = ''
  config.space = ''

  config.model = ml_collections.ConfigDict(dict(
      layers=5,
      channels=36,
      stem_multiplier=3,
      use_aux_head=True,
      aux_weight=0.4,
      drop_path_keep=0.6,
      dropout_keep=0.8,
      drop_path_identity=True,
      relu_before_gap=False,
      avg_pool_exclude_pad=False,
      aux_head_tf_position=False,
      merge_convs=True,
  ))
  config.data = ml_collections.ConfigDict(dict(
      name='cifar10',
      source='auto',            # local files under data.path / $NAO_DATA_DIR, else tfds
      path='',
      split='train',            # all 50k; 'train_dev' holds out 5k and evaluates on them
      num_dev=5000,
      dev_seed=0,
      limit_per_class=0,
      train_subset=0,
      synthetic_train=256,
      synthetic_test=64,
      normalization='per_image',
      mean_std_stats='cifar10',
      pad=4,
      cutout=0,                 # TF-WS default: none
      cutout_style='tf',
      tfds_data_dir='',
      cache_dir='',
  ))
  config.train = ml_collections.ConfigDict(dict(
      epochs=630,
      batch_size=144,
      eval_batch_size=100,      # TF
      momentum=0.9,
      nesterov=True,
      lr_schedule='sgdr',
      lr_max=0.05,
      lr_min=1e-4,
      sgdr_t0=10,
      sgdr_t_mul=2,
      weight_decay=2e-4,
      l2_form='sum_sq',         # TF-WS: wd * sum w^2 in the loss
      decay_before_clip=True,   # TF: L2 is part of the clipped loss gradient
      grad_clip=0.0,            # bug-faithful: TF-WS's clip is a no-op
      drop_path_step_offset=1,  # TF-WS: r_step = (global_step + 1) / total_steps
      max_steps=0,
  ))
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  return cifar_common.apply_variant(config, arg)
