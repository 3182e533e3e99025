"""An append-only, crash-safe record of every evaluation: ``history.jsonl``.

Each record is one JSON line, flushed and fsynced before the next evaluation starts, so a kill at
any moment loses at most the line being written. On reopening, a torn last line (no newline, or
not valid JSON) is cut off; damage anywhere else is reported, never silently dropped.

In a multi-process run every process reads the file and keeps the same records in memory, and
only the primary process (``parallel.is_primary()``) writes it (appends, and cuts a torn line).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from absl import logging

from nao_jax import parallel


class History:
  """Append-only JSON-lines file of records (dicts).

  Args:
    path: the file; read if it exists.
    writable: whether this process writes the file; default ``parallel.is_primary()``. A
      read-only history keeps appended records in memory only.
  """

  def __init__(self, path: str, writable: bool | None = None):
    self.path = path
    self.writable = parallel.is_primary() if writable is None else writable
    self.records: list[dict] = []
    if os.path.exists(path):
      self.records = self._read_and_repair()
    self._file = open(path, 'a', encoding='utf-8') if self.writable else None

  def _read_and_repair(self) -> list[dict]:
    with open(self.path, 'rb') as f:
      data = f.read()
    complete = data.rfind(b'\n') + 1  # bytes up to the last full line
    records = []
    lines = data[:complete].decode('utf-8').splitlines()
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        if number == len(lines):  # torn by a kill between write and fsync of a longer record
          complete = data.rfind(b'\n', 0, complete - 1) + 1
          break
        raise ValueError(f'{self.path}:{number} is not valid JSON ({e}); the history is damaged '
                         f'before its last line, refusing to continue') from None
    if complete < len(data) and self.writable:
      logging.warning('%s: dropping a torn final record (%d bytes) left by an interrupted run',
                      self.path, len(data) - complete)
      with open(self.path, 'r+b') as f:
        f.truncate(complete)
        f.flush()
        os.fsync(f.fileno())
    return records

  def append(self, record: dict) -> None:
    """Writes one record durably (flush + fsync; read-only: not at all) and keeps it in memory."""
    if self._file is not None:
      self._file.write(json.dumps(record, sort_keys=True) + '\n')
      self._file.flush()
      os.fsync(self._file.fileno())
    self.records.append(record)

  def __iter__(self) -> Iterator[dict]:
    return iter(self.records)

  def __len__(self) -> int:
    return len(self.records)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
