"""Preemption notices (SIGTERM): finish the step, checkpoint it, stop with ``Preempted``.

Cloud VMs, TPU pods and SLURM announce a preemption with SIGTERM some seconds before the kill.
The launchers call ``install()`` (through ``experiments/common.setup``); a training loop runs
inside ``watching()`` and asks ``requested(step)`` at every step boundary; when it answers True
the loop saves a checkpoint of that step with its usual save function and raises
``Preempted(step)``, which the launcher turns into one line and exit status 143 (128 + SIGTERM).
Rerunning the same command resumes from that checkpoint::

    preemption.install()
    with preemption.watching():
      for step in ...:
        ...train one step...
        if preemption.requested(step + 1):
          save(step + 1)
          raise preemption.Preempted(step + 1)

Single process: the handler only sets a flag, and only while some loop is inside
``watching()``; outside one (loading data, a launcher without checks such as a search), and for a
second SIGTERM, the process terminates as before (default action). SIGINT is left alone.

Multi-process (``jax.distributed`` initialised with JAX's preemption service, the default): the
service installs its own SIGTERM notifier and propagates a notice to every process, and
``requested(step)`` is ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``,
True on every process at the same step, so the collective save happens at one step everywhere.
``install()`` then leaves SIGTERM to JAX. It requires every process to call ``requested`` at every
step with the same step ids (the loops do). Outside ``watching()`` a SIGTERM is then not fatal
(JAX's behaviour, unchanged). With the service disabled (``jax_enable_preemption_service``
False) each process falls back to its own flag, and processes may stop at different steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

_state = {'requested': False, 'watching': 0, 'installed': False}


class Preempted(Exception):
  """Training stopped on a preemption notice after checkpointing ``step``."""

  def __init__(self, step: int):
    super().__init__(f'preempted at step {step}: checkpoint saved; rerun the same command to '
                     'resume')
    self.step = step


def _sync_manager():
  """JAX's preemption sync manager when ``jax.distributed`` is initialised, else None."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  if distributed.global_state.client is None:
    return None
  return distributed.global_state.preemption_sync_manager


def _on_sigterm(signum, frame) -> None:  # pylint: disable=unused-argument
  if _state['watching'] and not _state['requested']:
    _state['requested'] = True
    return
  # Nobody will look at the flag (or this is the second notice): terminate as before.
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
  """Registers the SIGTERM handler (main thread only); a no-op under JAX's preemption service."""
  if _state['installed'] or _sync_manager() is not None:
    return
  signal.signal(signal.SIGTERM, _on_sigterm)
  _state['installed'] = True


@contextlib.contextmanager
def watching() -> Iterator[None]:
  """Marks a loop that checks ``requested``: inside it a SIGTERM only sets the flag."""
  _state['watching'] += 1
  try:
    yield
  finally:
    _state['watching'] -= 1


def requested(step: int) -> bool:
  """Whether to checkpoint ``step`` and stop: the local flag, or JAX's sync point (multi-process)."""
  if _sync_manager() is not None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(multihost_utils.reached_preemption_sync_point(step))
  return _state['requested']


def request() -> None:
  """Sets the flag as a SIGTERM would (tests, or a custom notice such as a metadata poll)."""
  _state['requested'] = True


def reset() -> None:
  """Clears the flag (tests; a process that continues after ``Preempted``)."""
  _state['requested'] = False


__all__ = ['Preempted', 'install', 'watching', 'requested', 'request', 'reset']
