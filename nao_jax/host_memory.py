"""Keeps freed host memory in the process instead of handing it back to the OS (Linux / glibc).

XLA:CPU allocates every intermediate buffer of a program afresh on each run. glibc returns large
freed blocks to the OS (``munmap`` or heap trimming), so the next run touches new pages and pays
a page fault per 4 KiB: on the controller's training step (many 2-6 MB buffers) that was a third
of the step (measured 48-52 ms -> 36-39 ms per step with the settings below). Raising glibc's
mmap and trim thresholds lets freed blocks be reused while they are still mapped; resident memory
grows by at most what the program's peak already needed.

This only changes how the C allocator recycles memory, never a computed value. It is applied
by the launchers and benchmarks on CPU (``--keep_host_memory``, default on); it does nothing on
other C libraries or operating systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value on 64-bit hosts
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

_applied = False


def keep_freed_memory() -> bool:
  """Sets glibc's malloc thresholds once per process; returns whether they are in effect."""
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
              (_M_TOP_PAD, TOP_PAD_BYTES))
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  return _applied
