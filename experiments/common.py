"""Shared pieces of the absl launchers: flag parsing and errors as one line.

Every launcher reports a bad flag, config key, config value or input file as one line
``error: ...`` on stderr with a non-zero exit status, before any work starts::

    if __name__ == '__main__':
      app.run(main, flags_parser=common.parse_flags)

    def main(argv):
      common.setup(argv)
      with common.one_line_errors():
        ...

Flags shared by every launcher (defined here, once): ``--distributed`` turns on multi-process
JAX (``jax.distributed.initialize`` in ``setup``, before anything touches a device);
``--coordinator_address``, ``--num_processes`` and ``--process_id`` are discovered on TPU pods,
SLURM and Open MPI, and are given explicitly for a manual multi-GPU or loopback CPU run. See
``nao_jax/parallel.py`` for what the launchers assume in a multi-process run.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import re
import sys
from typing import Iterator

from absl import flags
from absl import logging
import jax

from nao_jax import host_memory
from nao_jax import parallel
from nao_jax import preemption

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Multi-process run: calls jax.distributed.initialize before any device '
    'is used (TPU pods, multi-GPU hosts, clusters, loopback CPU processes).')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 for --distributed; discovered on TPU '
    'pods, SLURM and Open MPI.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes for --distributed; discovered when unset.',
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process\'s index (0 .. num_processes-1) for --distributed; '
    'discovered when unset.', lower_bound=0)
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    'keep_host_memory', True, 'Let glibc keep freed host memory for reuse instead of returning '
    'it to the OS (nao_jax/host_memory.py): fewer page faults on CPU, same results.')

# What the library raises for bad input: these become one line, everything else a traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)
# Exit status after a preemption notice was honoured (checkpoint saved): 128 + SIGTERM.
PREEMPTED_EXIT_STATUS = 143


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
  """Refuses positional arguments; absl logging (progress lines) to stdout, Orbax INFO muted.

  With ``--distributed`` it joins the multi-process run (``parallel.initialize_distributed``),
  which must happen before anything touches a device: call ``setup`` first in ``main``. SIGTERM
  becomes a preemption notice (``preemption.install``): training loops checkpoint the current
  step and stop with ``preemption.Preempted``, which ``one_line_errors`` reports.
  """
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  quiet_orbax()
  if _KEEP_HOST_MEMORY.value:
    host_memory.keep_freed_memory()
  explicit = {'--coordinator_address': _COORDINATOR_ADDRESS.value,
              '--num_processes': _NUM_PROCESSES.value, '--process_id': _PROCESS_ID.value}
  if not _DISTRIBUTED.value:
    given = [name for name, value in explicit.items() if value is not None]
    if given:
      sys.exit(f'error: {", ".join(given)} given without --distributed')
  else:
    if _PROCESS_ID.value is not None and _NUM_PROCESSES.value is not None and \
        _PROCESS_ID.value >= _NUM_PROCESSES.value:
      sys.exit(f'error: --process_id={_PROCESS_ID.value} must be below '
               f'--num_processes={_NUM_PROCESSES.value}')
    try:
      parallel.initialize_distributed(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value)
    except (ValueError, RuntimeError) as e:
      lines = str(e).strip().splitlines() or [type(e).__name__]
      sys.exit(f'error: --distributed: {lines[0]}')
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  preemption.install()  # after jax.distributed: under JAX's preemption service, a no-op


@contextlib.contextmanager
def one_line_errors(*extra: type[BaseException]) -> Iterator[None]:
  """Turns ``INPUT_ERRORS`` (and ``extra``) into ``error: <first line>`` and exit status 1.

  ``preemption.Preempted`` becomes ``preempted at step N: checkpoint saved; rerun the same
  command to resume`` on stderr and exit status 143 (128 + SIGTERM, as a process killed by it).
  """
  try:
    yield
  except preemption.Preempted as e:
    sys.stdout.flush()
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_STATUS)
  except INPUT_ERRORS + tuple(extra) as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    sys.exit(f'error: {lines[0]}')
