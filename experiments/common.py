"""Shared pieces of the absl launchers: flag parsing and errors as one line.

Every launcher reports a bad flag, config key, config value or input file as one line
``error: ...`` on stderr with a non-zero exit status, before any work starts::

    if __name__ == '__main__':
      app.run(main, flags_parser=common.parse_flags)

    def main(argv):
      common.setup(argv)
      with common.one_line_errors():
        ...
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import re
import sys
from typing import Iterator

from absl import flags
from absl import logging

# What the library raises for bad input: these become one line, everything else a traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error (bad config keys or values) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # config_flags: an override of a key that does not exist
    found = re.search(r'[A-Za-z_][A-Za-z0-9_]*', str(e))
    key = found.group(0) if found else ''
    culprit = next((a for a in argv[1:] if key and key in a), key)
    sys.exit(f'error: {culprit}: no such config key')
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines() or [type(e).__name__]
    sys.exit(f'error: {lines[0]}')


class _QuietLibraries(std_logging.Filter):
  """Drops INFO lines of Orbax (a dozen per checkpoint save), keeping its warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax() -> None:
  """Mutes Orbax's INFO lines (a dozen per checkpoint save) on the absl logger."""
  logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


def setup(argv: list[str]) -> None:
  """Refuses positional arguments; absl logging (progress lines) to stdout, Orbax INFO muted."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  quiet_orbax()


@contextlib.contextmanager
def one_line_errors(*extra: type[BaseException]) -> Iterator[None]:
  """Turns ``INPUT_ERRORS`` (and ``extra``) into ``error: <first line>`` and exit status 1."""
  try:
    yield
  except INPUT_ERRORS + tuple(extra) as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    sys.exit(f'error: {lines[0]}')
