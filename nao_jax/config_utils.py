"""Checks shared by the config resolvers of the training launchers (``cnn/final``, ``rnn/lm``)."""

from __future__ import annotations


def merge_sections(defaults: dict, values: dict, prefix: str = '') -> dict:
  """``defaults`` updated with ``values``, section by section; unknown keys are refused.

  Raises:
    ValueError: a key not in ``defaults`` (named with its dotted path), or a scalar given where
      ``defaults`` has a section.
  """
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(f'unknown config key {prefix}{unknown[0]}; known at this level: '
                     f'{", ".join(sorted(defaults))}')
  merged = dict(defaults)
  for key, value in values.items():
    if isinstance(defaults[key], dict):
      if not isinstance(value, dict):
        raise ValueError(f'config key {prefix}{key} must be a section, got {value!r}')
      merged[key] = merge_sections(defaults[key], value, f'{prefix}{key}.')
    else:
      merged[key] = value
  return merged


def check_choice(name: str, value, choices) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f'{name} = {value!r}; choose one of {", ".join(map(str, choices))}')
