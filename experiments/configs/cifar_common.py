"""What the CIFAR final-training configs share: the seed recipe and the variants.

``final_config`` builds the seed recipe (TF ``train_cifar10_final.sh``: NAONet-A, N=6, F=128,
spec §6.5); each config file names only what its recipe changes, with the reason.

``tiny`` (alias ``runlocal``) keeps every code path of the full recipe (auxiliary head,
drop-path, cutout, the schedule, checkpoints, evaluation) at a size that runs in seconds on a
laptop CPU: N=1, F=8, batch 16, 2 epochs of 256 synthetic images. For real data on a laptop add
``--config.data.source=auto --config.data.path=../shared/data`` (and ``--config.data.train_subset``).
"""

import ml_collections

from nao_jax.config_utils import merge_sections

VARIANTS = ('', 'tiny', 'runlocal')

# PT-V1's training differences from the TF seed recipe (``train_NAONet_*_cifar10.sh``).
PT_TRAIN = dict(
    eval_batch_size=500,
    lr_max=0.025,
    decay_before_clip=False,  # PT: clip, then add wd * w
    drop_path_step_offset=1,  # PT: r_step = (step + 1) / total_steps
)
PT_DATA = dict(cutout_style='pytorch')  # PT: cutout centre uniform


def final_config(arch: str, arg: str | None, *, model: dict | None = None,
                 data: dict | None = None, train: dict | None = None,
                 ) -> ml_collections.ConfigDict:
  """The seed recipe with ``arch`` and each section's ``overrides``, then the variant ``arg``.

  Raises:
    ValueError: an override names a key the recipe does not have (a typo would otherwise add a
      setting that nothing reads).
  """
  recipe = dict(seed=0, arch=arch, arch_string='', space='')
  recipe['model'] = dict(
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
  )
  recipe['data'] = dict(
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
  )
  recipe['train'] = dict(
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
  )
  recipe.update(log_every_steps=50, eval_every_epochs=5, checkpoint_every_steps=0,
                keep_checkpoints=2)
  overrides = {'model': model or {}, 'data': data or {}, 'train': train or {}}
  return apply_variant(ml_collections.ConfigDict(merge_sections(recipe, overrides)), arg)


def apply_variant(config, arg: str | None):
  """Returns ``config`` changed per the variant named after the ``:`` of ``--config``."""
  arg = (arg or '').strip()
  if arg not in VARIANTS:
    raise ValueError(f'unknown config variant {arg!r}; choose tiny (or runlocal), or none')
  if arg in ('tiny', 'runlocal'):
    config.model.layers = 1
    config.model.channels = 8
    config.data.source = 'synthetic'
    config.data.synthetic_train = 256
    config.data.synthetic_test = 64
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.log_every_steps = 4
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 0
  return config
