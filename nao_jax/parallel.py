"""Data parallelism over every device of every host, with global-view ``jax.sharding``.

One 1-D mesh axis ``'data'`` spans all devices of all processes. Batches are sharded along it,
parameters and optimizer state are replicated, and ``jit`` with these shardings lets XLA insert
the gradient all-reduce. Each host feeds only its own slice of a global batch
(``host_batch_slice`` says which rows), and ``global_batch`` assembles the slices into one global
array. Every host draws architectures from the same seed, so all devices train the same
architecture at a step without communicating.

Multi-process runs (TPU pods, multi-GPU hosts and clusters, loopback CPU): the launchers take
``--distributed`` (``experiments/common.py``), which calls ``initialize_distributed()`` before
anything touches a device. On Cloud TPU, SLURM and Open MPI the coordinator, process count and
process id are discovered; elsewhere pass ``--coordinator_address=HOST:PORT``,
``--num_processes`` and ``--process_id`` (or ``JAX_COORDINATOR_ADDRESS``, see WORKSPACE.md).
``tests/test_distributed.py`` checks that two loopback CPU processes train exactly as one.

What the launchers assume in a multi-process run (they are not specialised for it; checked with
two loopback CPU processes only, never on GPUs or TPUs):

* every process runs the same command, config and seed, so host-side decisions (architecture
  sampling, pool order, evaluation schedule) agree without communication;
* all processes share one ``--workdir`` (a shared file system on a cluster). Every process reads
  it (``config.json``, ``history.jsonl``, ``results.json``, the checkpoints, ``metrics.json``), so
  a resumed run replays and restores identically everywhere, and keeps the same history in
  memory; only the primary process (``is_primary()``) writes the plain files (``config.json``,
  ``history.jsonl``, ``results.json``, ``metrics.json``, ``eval_<step>.json``, plots, drawings,
  TensorBoard: ``progress.ScalarWriter`` is a no-op elsewhere). ``sync_processes`` makes every
  process finish reading before the primary writes. Orbax checkpoints are collective: every
  process calls save and restore, and the replicated arrays are written once;
* the data-parallel code paths put their batches on a mesh over all processes' devices
  (``cnn/final.py``: ``train_cifar`` / ``evaluate_cifar``; ``rnn/lm.py``: ``train_lm``, whose
  time-major ``[T, B]`` windows are split on the batch axis 1, as the ``ws_rnn`` evaluator's;
  the ``ws_cnn`` evaluator with ``data_parallel``). The ``scratch_cnn`` evaluator and NAO-WS
  re-ranking spread their candidates over the processes (candidate ``i`` on process
  ``i mod process_count``, each on one local device; ``spread_over_processes``) and exchange the
  results with ``exchange_json``. A search's controller trains data parallel over the mesh when
  its minibatch splits evenly over all devices (``search/nao.py``), and proposes from a local
  copy of its replicated parameters; the tabular evaluator is repeated by every process.

Checked (``tests/test_distributed.py``, 2 loopback processes against one process with the same 2
devices, equal floats): ``train_cifar`` SIGKILLed after its first epoch's checkpoint and
``train_lm`` stopped by ``train.max_steps``, both sharing one ``--workdir``, rerun, resume and end
with the same metrics, and ``evaluate_cifar`` / ``train_lm --evaluate`` then score the run as
training reported; the ``scratch_cnn`` evaluator and ``ws_cnn`` re-ranking train each candidate
once, on its process, and return every result; a tabular NAO ``search`` SIGKILLed after its
first round and rerun. ``tests/test_distributed_rnn.py``: a toy NAO-WS RNN ``search`` (the
``ws_rnn`` supernet's columns split over the mesh) killed after a mid-epoch supernet checkpoint
and rerun. ``tests/test_sharding.py``: 8 fake devices against 1 (the controller, ``train_lm``,
``train_cifar``, and a CNN cell's gradient in float64). Not run with several processes: the CNN
supernet's resume after a kill (the RNN one's is); a toy NAO-WS CNN search over 2 processes gave
1 process's history and result when run by hand (2026-11-29), but is not a test (its supernet
compiles cost the CI budget too much).
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize``; arguments left ``None`` are discovered (TPU, SLURM, Open MPI).

  Call it only for multi-process runs (launchers do so behind ``--distributed``), before any
  other JAX call touches a device. When the CPU backend may be used (``jax_platforms`` unset or
  naming ``cpu``) and no CPU collectives were chosen, it selects gloo
  (``jax_cpu_collectives_implementation='gloo'``, over TCP through the coordinator): without
  cross-process CPU collectives a multi-process CPU computation cannot all-reduce (jax 0.10
  already defaults to gloo; older releases defaulted to none). An explicit choice (``mpi``) is
  kept. The option only affects the CPU client, so it is harmless on GPU and TPU.

  Raises:
    RuntimeError: when a JAX backend is already initialised (JAX's own check).
  """
  platforms = jax.config.jax_platforms or ''
  if (not platforms or 'cpu' in platforms.split(',')) and \
      jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
  """Whether this process writes the run directory's plain files (``jax.process_index() == 0``).

  Always True in a single-process run. In a multi-process run every process reads the run
  directory (so that all take the same decisions on a resume), and only the primary writes
  ``config.json``, ``history.jsonl``, ``results.json``, ``metrics.json``, plots and TensorBoard
  events; Orbax checkpoints are collective (every process calls save, see ``checkpoint.py``).
  """
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """A barrier across all processes of a multi-process run; nothing in a single-process run.

  Used after every process has read a run directory and before the primary writes to it, so that
  a slow process never reads what a fast one has already written in this run.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


# Numbers the exchange_json calls of this process: every process makes the same calls in the same
# order, so the numbers (and the keys in the coordination service) agree.
_EXCHANGES = itertools.count()


def exchange_json(value: Any, timeout_s: float = 7 * 24 * 3600) -> list[Any]:
  """Every process's ``value`` (JSON-serialisable), in process order; ``[value]`` in one process.

  Goes through the key-value store of JAX's coordination service (``jax.distributed``), not
  through device collectives: a process that finished its share of uneven host work early may
  wait here for hours (a CPU gloo collective whose peer is late fails after 30 s), and floats
  arrive exactly (JSON keeps float64; a device collective rounds them to float32 without
  ``jax_enable_x64``). Every process must make the same calls in the same order.

  Args:
    value: this process's contribution.
    timeout_s: how long to wait for the slowest process (default a week).
  """
  if jax.process_count() == 1:
    return [value]
  # The client is not public API in jax 0.10; Orbax reaches it the same way.
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  prefix = f'nao_jax/exchange_json/{next(_EXCHANGES)}/'
  client.key_value_set(prefix + str(jax.process_index()), json.dumps(value))
  timeout_ms = int(timeout_s * 1000)
  return [json.loads(client.blocking_key_value_get(prefix + str(p), timeout_ms))
          for p in range(jax.process_count())]


def spread_over_processes(items: Sequence[Any], work: Callable[[list], list]) -> list:
  """Independent work items spread over the processes; every process returns all results.

  Item ``i`` goes to process ``i mod process_count``: each process calls ``work`` once on its
  share (in item order) and must get back one JSON-serialisable result per item; the results are
  then exchanged (``exchange_json``) and returned in item order, the same list on every process.
  In one process this is ``work(list(items))``. Every process must call this with the same items.

  Raises:
    RuntimeError: another process's ``work`` raised (named; its own log has the traceback). The
      process whose ``work`` raised re-raises its own exception after telling the others.
  """
  items = list(items)
  count, me = jax.process_count(), jax.process_index()
  if count == 1 or not items:
    return work(items)
  try:
    local, error = work(items[me::count]), None
  except Exception as e:  # pylint: disable=broad-except
    # The other processes wait for this one's results below: tell them, then raise here.
    local, error = None, e
  parts = exchange_json({'failed': None if error is None else repr(error), 'results': local})
  if error is not None:
    raise error
  results: list[Any] = [None] * len(items)
  for process, part in enumerate(parts):
    if part['failed'] is not None:
      raise RuntimeError(f'process {process} failed on its share of the work '
                         f'({part["failed"]}); see its log')
    for i, record in zip(range(process, len(items), count), part['results']):
      results[i] = record
  return results


def data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Axis ``axis`` (the batch; 1 for time-major ``[T, B]`` windows) split over ``'data'``."""
  if axis < 0:
    raise ValueError(f'axis = {axis}; expected a non-negative axis index')
  return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` on all devices of ``mesh``.

  In a multi-process run every process must pass the same values (JAX checks host values and
  uncommitted arrays). Typed PRNG keys go through their key data there, since ``device_put``
  refuses key arrays for a sharding with devices of other processes.
  """
  sharding = replicated(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """Raises ``ValueError`` unless the global batch splits evenly over the mesh."""
  if global_batch % mesh.size:
    raise ValueError(f'global batch {global_batch} is not divisible by the {mesh.size} devices '
                     f'of the data mesh')


def column_mesh(batch_size: int, config_key: str) -> Mesh:
  """The data mesh over every device of every process, for ``batch_size`` columns split over it.

  Raises:
    ValueError: ``batch_size`` (the config value ``config_key``) does not divide by the device
      count; every device trains an equal share of the columns.
  """
  mesh = data_mesh()
  if batch_size % mesh.size:
    raise ValueError(f'{config_key} = {batch_size} does not divide over the {mesh.size} '
                     f'devices of the data mesh ({jax.process_count()} process(es)); every '
                     f'device trains an equal share of the columns: use a multiple of '
                     f'{mesh.size}')
  return mesh


def split_zeros(rows: int, width: int, mesh: Mesh) -> jax.Array:
  """``float32[rows, width]`` zeros split over ``mesh`` by rows (each process makes its own)."""
  mine = host_batch_slice(rows, mesh)
  return global_batch(np.zeros((mine.stop - mine.start, width), np.float32), mesh)


def host_batch_slice(global_batch: int, mesh: Mesh) -> slice:
  """Rows of a global batch that this process feeds."""
  check_batch_size(global_batch, mesh)
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(host_arrays, mesh: Mesh, axis: int = 0):
  """Assembles per-host slices into global arrays sharded over ``'data'``.

  Args:
    host_arrays: a tree of this process's rows (``host_batch_slice``) of each global batch,
      sliced along ``axis``.
    mesh: the data mesh.
    axis: the batch axis (0; 1 for time-major ``[T, B]`` windows).
  """
  sharding = batch_sharding(mesh, axis)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_arrays)


def gather(tree, mesh: Mesh):
  """Replicated copies of ``tree``'s arrays on every device of ``mesh`` (an all-gather).

  A batch-sharded array of a multi-process run cannot be read on one host; its replicated copy
  can (``np.asarray``, checkpoint saves).
  """
  return _gather_program(mesh)(tree)


@functools.lru_cache(maxsize=None)
def _gather_program(mesh: Mesh):
  # One jitted identity per mesh: a new lambda per call would be traced and compiled again.
  return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))
