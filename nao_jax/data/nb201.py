"""NAS-Bench-201 tables: ``arch_str,valid_accuracy[,train_seconds]`` CSV files.

The file in ``$NAO_DATA_DIR/nasbench201/nb201_cifar10valid_valid_acc.csv`` is one (all 15,625
cells, cifar10-valid validation accuracy after 200 epochs, in %). ``experiments/export_nb201.py``
writes such a file from the official NATS-Bench API.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

from nao_jax.spaces.nb201 import NB201_SPACE

DEFAULT_TABLE = os.path.join('nasbench201', 'nb201_cifar10valid_valid_acc.csv')
REQUIRED_COLUMNS = ('arch_str', 'valid_accuracy')


@dataclasses.dataclass(frozen=True)
class Nb201Table:
  """A NAS-Bench-201 table.

  Attributes:
    archs: ``int32[N, 6]`` architectures (op ids per edge).
    accuracy: ``float64[N]`` validation accuracy in %.
    train_seconds: ``float64[N]`` simulated training time, or None if the column is absent.
    path: where it was read from.
  """
  archs: np.ndarray
  accuracy: np.ndarray
  train_seconds: np.ndarray | None
  path: str

  def lookup(self) -> dict[str, int]:
    """Maps each official arch string to its row."""
    return {NB201_SPACE.format(a): i for i, a in enumerate(self.archs)}


def default_table_path(data_dir: str | None = None) -> str | None:
  """The table under ``data_dir`` or ``$NAO_DATA_DIR``, if either is set."""
  root = data_dir or os.environ.get('NAO_DATA_DIR')
  return os.path.join(root, DEFAULT_TABLE) if root else None


def load_table(path: str) -> Nb201Table:
  """Reads and checks a NAS-Bench-201 CSV table.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: missing columns, an unparsable or duplicate architecture, or a score that is not
      a finite number; the message names the line.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'NAS-Bench-201 table not found: {path!r} (set --config.table or '
                            f'NAO_DATA_DIR)')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
      raise ValueError(f'{path}: missing column(s) {missing}; found {columns}')
    has_seconds = 'train_seconds' in columns
    archs, accuracy, seconds, seen = [], [], [], {}
    for line, row in enumerate(reader, start=2):
      text = (row['arch_str'] or '').strip()
      try:
        arch = NB201_SPACE.parse(text)
      except ValueError as e:
        raise ValueError(f'{path}:{line}: cannot parse arch_str: {e}') from None
      key = arch.tobytes()
      if key in seen:
        raise ValueError(f'{path}:{line}: duplicate architecture {text} (first on line {seen[key]})')
      seen[key] = line
      archs.append(arch)
      accuracy.append(_number(row['valid_accuracy'], path, line, 'valid_accuracy'))
      if has_seconds:
        seconds.append(_number(row['train_seconds'], path, line, 'train_seconds'))
  if not archs:
    raise ValueError(f'{path}: the table has no rows')
  return Nb201Table(np.stack(archs), np.asarray(accuracy),
                    np.asarray(seconds) if has_seconds else None, path)


def _number(text, path: str, line: int, column: str) -> float:
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise ValueError(f'{path}:{line}: {column} = {text!r} is not a number') from None
  if not math.isfinite(value):
    raise ValueError(f'{path}:{line}: {column} = {text!r} is not finite')
  return value
