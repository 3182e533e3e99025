"""The glibc malloc settings of nao_jax.host_memory."""

import ctypes
import sys

import pytest

from nao_jax import host_memory


def _is_glibc() -> bool:
  try:
    return bool(ctypes.CDLL('libc.so.6').gnu_get_libc_version)
  except (OSError, AttributeError):
    return False


@pytest.mark.skipif(not (sys.platform.startswith('linux') and _is_glibc()),
                    reason='glibc-only setting')
def test_keep_freed_memory_applies_on_glibc_and_is_idempotent():
  assert host_memory.keep_freed_memory()
  assert host_memory.keep_freed_memory()


def test_launchers_expose_the_switch():
  from experiments import common  # pylint: disable=import-outside-toplevel
  assert common.flags.FLAGS['keep_host_memory'].default is True
