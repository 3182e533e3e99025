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
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.arch = 'NAONet-A'
  config.arch_string = ''
  config.space = ''

  config.model = ml_collections.ConfigDict(dict(
      layers=6,
      channels=128,
      stem_multiplier=3,
      use_aux_head=True,
      aux_weight=0.4,
      drop_path_keep=0.7,
      dropout_keep=0.6,
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
      cutout=16,
      cutout_style='tf',
      tfds_data_dir='',
      cache_dir='',
  ))
  config.train = ml_collections.ConfigDict(dict(
      epochs=600,
      batch_size=128,
      eval_batch_size=100,      # TF
      momentum=0.9,
      nesterov=False,
      lr_schedule='cosine',
      lr_max=0.024,
      lr_min=0.0,
      sgdr_t0=10,
      sgdr_t_mul=2,
      weight_decay=5e-4,
      l2_form='half_sum_sq',
      decay_before_clip=True,   # TF: L2 is part of the clipped loss gradient
      grad_clip=5.0,
      drop_path_step_offset=0,  # TF-NAO: r_step = global_step / total_steps
      max_steps=0,
  ))
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  return cifar_common.apply_variant(config, arg)
