"""The variants shared by the language-model configs (``--config=FILE:VARIANT``).

* ``official``: the official NAO code's recipe (``NAO/rnn/train_*_final.sh``, spec §6.8): SGD at
  lr 20 switching to averaged SGD by the non-monotone trigger (NT-ASGD), with the official
  weight decay (PTB 8e-7, WikiText-2 5e-7). The default is the seed's recipe.
* ``tiny`` (alias ``runlocal``): every code path (variable BPTT, dropouts, TAR, the schedule,
  checkpoints, best-valid state, test evaluation) at a size that runs in about a minute on a
  laptop CPU on the real corpus: E = H = 16, batch 8, BPTT 10, the first 4,000 training tokens,
  2 epochs (validation and test still read the whole splits).
* Both: ``official,tiny``.
"""

VARIANTS = ('official', 'tiny', 'runlocal')


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
