"""What the language-model configs share: the seed recipe and the variants (``FILE:VARIANT``).

``final_config`` builds the seed recipe for PTB (``naonet_ptb.py`` describes it); each config
file names only what its recipe changes.

* ``official``: the official NAO code's recipe (``NAO/rnn/train_*_final.sh``, spec §6.8): SGD at
  lr 20 switching to averaged SGD by the non-monotone trigger (NT-ASGD), with the official
  weight decay (PTB 8e-7, WikiText-2 5e-7). The default is the seed's recipe.
* ``tiny`` (alias ``runlocal``): every code path (variable BPTT, dropouts, TAR, the schedule,
  checkpoints, best-valid state, test evaluation) at a size that runs in about a minute on a
  laptop CPU on the real corpus: E = H = 16, batch 8, BPTT 10, the first 4,000 training tokens,
  2 epochs (validation and test still read the whole splits).
* Both: ``official,tiny``.
"""

import ml_collections

from nao_jax.config_utils import merge_sections

VARIANTS = ('official', 'tiny', 'runlocal')


def final_config(arch: str, arg: str | None, *, official_weight_decay: float,
                 dataset: str = 'ptb', model: dict | None = None,
                 train: dict | None = None) -> ml_collections.ConfigDict:
  """The PTB seed recipe with ``arch``, ``dataset`` and each section's overrides, then ``arg``.

  Raises:
    ValueError: an override names a key the recipe does not have.
  """
  recipe = dict(seed=1267, arch=arch, arch_string='', space='', dataset=dataset, data_dir='',
                train_tokens=0)
  recipe['model'] = dict(
      emb_size=850,
      hidden_size=850,
      dropout=0.75,
      dropouth=0.25,
      dropoutx=0.75,
      dropouti=0.2,
      dropoute=0.0,
      init_range=0.04,
      output_average='exclude_s0',
      fuse=True,
  )
  recipe['train'] = dict(
      epochs=4000,
      batch_size=64,
      eval_batch_size=10,
      test_batch_size=1,
      bptt=35,
      schedule='exp_decay',
      lr=10.0,
      lr_decay=0.9991,
      lr_decay_start_epoch=15,
      nonmono=5,
      clip=0.25,
      weight_decay=5e-7,
      tar_beta=1e-3,
      ar_alpha=0.0,
      seq_p_full=0.95,
      seq_std=5.0,
      seq_min_len=5,
      seq_max_delta=20,
      pad_multiple=5,
      max_steps=0,
      max_rollbacks=3,
      rollback_to='last',
  )
  recipe.update(log_every_steps=50, checkpoint_every_steps=0, keep_checkpoints=2,
                evaluate_test=True)
  config = merge_sections(recipe, {'model': model or {}, 'train': train or {}})
  return apply_variant(ml_collections.ConfigDict(config), arg, official_weight_decay)


def apply_variant(config, arg: str | None, official_weight_decay: float):
  """Returns ``config`` changed per the comma-separated variants after the ``:`` of --config."""
  names = [a.strip() for a in (arg or '').split(',') if a.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f'unknown config variant {unknown[0]!r}; choose from official, tiny '
                     '(or runlocal), comma-separated, or none')
  if 'official' in names:
    config.train.schedule = 'nt_asgd'
    config.train.lr = 20.0
    config.train.weight_decay = official_weight_decay
  if 'tiny' in names or 'runlocal' in names:
    config.model.emb_size = config.model.hidden_size = 16
    config.train_tokens = 4000
    config.train.epochs = 2
    config.train.batch_size = 8
    config.train.eval_batch_size = 10
    config.train.test_batch_size = 10
    config.train.bptt = 10
    config.train.seq_std = 2.0
    config.train.seq_max_delta = 5
    config.train.pad_multiple = 15   # one training program
    config.log_every_steps = 10
  return config
