"""Test-wide settings: small compile times on a 2-core CI machine, no hypothesis deadlines."""

import os

import hypothesis
import jax

from nao_jax import host_memory

# Tests use tiny shapes, so XLA's optimisation passes cost more than they save.
jax.config.update('jax_disable_most_optimizations', True)
# As the launchers do: reuse freed host memory instead of faulting in fresh pages every step.
host_memory.keep_freed_memory()

hypothesis.settings.register_profile('ci', deadline=None, max_examples=40, derandomize=True,
                                     print_blob=True)
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


def data_dir_or_skip(*parts: str) -> str:
  """Returns ``$NAO_DATA_DIR/<parts>`` or skips the test with a clear message."""
  import pytest  # pylint: disable=import-outside-toplevel
  root = os.environ.get('NAO_DATA_DIR')
  if not root:
    pytest.skip('NAO_DATA_DIR not set; real-data test skipped')
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    pytest.skip(f'{path} not found; real-data test skipped')
  return path
