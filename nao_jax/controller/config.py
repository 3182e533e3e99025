"""Controller hyper-parameters (spec §3.1), with the PT-V1 values as defaults.

Every documented variant of the official code is a field here rather than a fork:

* ``attention='bahdanau'``: the TF decoders' normalised Bahdanau attention with input feeding
  (default ``'luong'``: PT-V1's dot-product attention on the LSTM output).
* ``init='uniform'`` + ``forget_bias=1.0``: TF's uniform(+-0.1) init and LSTM forget bias.
* ``l2_mode='loss'``: TF adds ``l2 * sum(w^2) / 2`` to the loss, clipped together with the data
  gradient; default ``'adam_coupled'`` is PT's Adam ``weight_decay`` (added after clipping).
* ``encoder_dropout_on='outputs'``: TF applies encoder dropout to the LSTM outputs, PT to the
  token embeddings.
* ``warm_start`` / ``keep_optimizer_state``: PT keeps the model across search rounds but starts a
  fresh Adam; TF-WS restores both.
* ``target_orientation``: ``'native'`` trains on min-max normalised raw scores and steps along
  ``+grad`` when the evaluator's score is higher-is-better (PT-V1 accuracy) and ``-grad`` when it
  is lower-is-better (TF error / perplexity / NLL). ``'error'`` turns higher-is-better scores into
  errors first (TF-NAO-CNN's targets on an accuracy evaluator); ``'accuracy'`` the reverse.
* ``target_transform='rank'``: targets are pool ranks scaled to [0, 1] instead of min-max scores
  (a deviation, not in the official code): the predictor then spends its resolution on the order
  of the good architectures, not on how bad the worst ones are.
"""

from __future__ import annotations

import dataclasses

from nao_jax.spaces.base import SearchSpace

_CHOICES = {
    'attention': ('luong', 'bahdanau'),
    'init': ('pytorch', 'uniform'),
    'l2_mode': ('adam_coupled', 'loss'),
    'encoder_dropout_on': ('embeddings', 'outputs'),
    'target_orientation': ('native', 'error', 'accuracy'),
    'target_transform': ('minmax', 'rank'),
}


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  """Sizes and training settings of the encoder-predictor-decoder (EPD) controller.

  ``vocab_size``, ``source_length`` and ``tokens_per_step`` come from the search space; use
  ``ControllerConfig.for_space``.
  """
  vocab_size: int
  source_length: int
  tokens_per_step: int
  emb_size: int = 48
  hidden_size: int = 96
  mlp_layers: int = 3
  mlp_hidden: int = 200
  mlp_dropout: float = 0.1
  encoder_dropout: float = 0.0
  encoder_dropout_on: str = 'embeddings'
  decoder_dropout: float = 0.0
  attention: str = 'luong'
  init: str = 'pytorch'
  forget_bias: float = 0.0
  trade_off: float = 0.8  # weight of the MSE term; 1 - trade_off weighs reconstruction
  lr: float = 1e-3
  l2: float = 1e-4
  l2_mode: str = 'adam_coupled'
  grad_clip: float = 5.0
  batch_size: int = 100
  epochs: int = 1000
  swap_augment: bool = True
  warm_start: bool = True
  keep_optimizer_state: bool = False
  target_orientation: str = 'native'
  target_transform: str = 'minmax'

  def __post_init__(self):
    for field, choices in _CHOICES.items():
      if getattr(self, field) not in choices:
        raise ValueError(f'controller.{field} = {getattr(self, field)!r}; choose one of {choices}')
    for field in ('vocab_size', 'source_length', 'tokens_per_step', 'emb_size', 'hidden_size',
                  'batch_size'):
      if getattr(self, field) < 1:
        raise ValueError(f'controller.{field} must be >= 1, got {getattr(self, field)}')
    if self.source_length % self.tokens_per_step:
      raise ValueError(f'controller.source_length {self.source_length} is not a multiple of '
                       f'tokens_per_step {self.tokens_per_step}')
    if self.emb_size * self.tokens_per_step != self.hidden_size:
      # The PyTorch encoders hard-wire the LSTM input size to hidden_size (spec §2.5).
      raise ValueError(f'controller.emb_size * tokens_per_step must equal hidden_size, got '
                       f'{self.emb_size} * {self.tokens_per_step} != {self.hidden_size}')
    if not 0.0 <= self.trade_off <= 1.0:
      raise ValueError(f'controller.trade_off must be in [0, 1], got {self.trade_off}')
    for field in ('mlp_dropout', 'encoder_dropout', 'decoder_dropout'):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f'controller.{field} must be in [0, 1), got {getattr(self, field)}')

  @property
  def encoder_length(self) -> int:
    return self.source_length // self.tokens_per_step

  @classmethod
  def for_space(cls, space: SearchSpace, **overrides) -> 'ControllerConfig':
    """The default controller for ``space``: token embedding = hidden / tokens per step.

    Raises:
      ValueError: for an unknown field name (listing the known ones) or an invalid value.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f'unknown controller config key(s) {unknown}; known: {sorted(known)}')
    overrides = dict(overrides)
    for derived in ('tokens_per_step', 'emb_size'):  # 0 in a config file: derive from the space
      if not overrides.get(derived, 1):
        del overrides[derived]
    hidden = overrides.get('hidden_size', cls.hidden_size)
    tokens_per_step = overrides.get('tokens_per_step', space.tokens_per_step)
    values = dict(vocab_size=space.vocab_size, source_length=space.seq_len,
                  tokens_per_step=tokens_per_step, emb_size=hidden // tokens_per_step)
    values.update(overrides)
    return cls(**values)


def config_file_defaults(**overrides) -> dict:
  """Every tunable controller field with its default, for ``ml_collections`` config files.

  The space fixes ``vocab_size`` and ``source_length``; ``tokens_per_step`` and ``emb_size`` are
  0 here, meaning "derive from the space" (emb = hidden / tokens per step).
  """
  values = {f.name: f.default for f in dataclasses.fields(ControllerConfig)
            if f.name not in ('vocab_size', 'source_length')}
  values.update(tokens_per_step=0, emb_size=0)
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f'unknown controller config key(s) {unknown}')
  values.update(overrides)
  return values
