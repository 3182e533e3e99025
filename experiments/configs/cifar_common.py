"""The variants shared by the CIFAR final-training configs (``--config=FILE:tiny``).

``tiny`` (alias ``runlocal``) keeps every code path of the full recipe (auxiliary head,
drop-path, cutout, the schedule, checkpoints, evaluation) at a size that runs in seconds on a
laptop CPU: N=1, F=8, batch 16, 2 epochs of 256 synthetic images. For real data on a laptop add
``--config.data.source=auto --config.data.path=../shared/data`` (and ``--config.data.train_subset``).
"""

VARIANTS = ('', 'tiny', 'runlocal')


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
