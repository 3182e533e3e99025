"""Data parallelism over every device of every host, with global-view ``jax.sharding``.

One 1-D mesh axis ``'data'`` spans all devices of all processes. Batches are sharded along it,
parameters and optimizer state are replicated, and ``jit`` with these shardings lets XLA insert
the gradient all-reduce. Each host feeds only its own slice of a global batch
(``host_batch_slice`` says which rows), and ``global_batch`` assembles the slices into one global
array. Every host draws architectures from the same seed, so all devices train the same
architecture at a step without communicating.

Multi-host (TPU pods, multi-GPU clusters): call ``initialize_distributed()`` first; on Cloud TPU
the coordinator is discovered automatically, elsewhere pass ``coordinator_address``,
``num_processes`` and ``process_id`` (or set them in the environment, see WORKSPACE.md).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize``; without arguments it auto-detects TPU pods and SLURM.

  Call it only for multi-process runs (launchers do so behind ``--config.distributed``), before
  any other JAX call.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``'data'``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """Raises ``ValueError`` unless the global batch splits evenly over the mesh."""
  if global_batch % mesh.size:
    raise ValueError(f'global batch {global_batch} is not divisible by the {mesh.size} devices '
                     f'of the data mesh')


def host_batch_slice(global_batch: int, mesh: Mesh) -> slice:
  """Rows of a global batch that this process feeds."""
  check_batch_size(global_batch, mesh)
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(host_arrays, mesh: Mesh):
  """Assembles per-host slices (leading axis) into global arrays sharded over ``'data'``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_arrays)
