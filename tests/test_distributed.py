"""Two CPU processes over loopback train exactly as one process with the same devices.

Each child is a launcher-style program: it parses the shared flags of ``experiments/common.py``
and calls ``common.setup``, which with ``--distributed`` joins a ``jax.distributed`` run (gloo
CPU collectives, coordinator on localhost). It then trains on a data mesh over every device of
every process:

* the NAO controller (``train_epochs`` with ``mesh=``, a few epochs of Adam on a small pool);
* a jitted data-parallel SGD step whose batch is assembled from per-host slices with
  ``parallel.host_batch_slice`` and ``parallel.global_batch``.

The reference is the same program in one process with the same number of (fake) devices.

A launcher end to end: ``experiments.train_cifar`` (tiny variant, cheap cell) in two processes
sharing one ``--workdir`` (only process 0 writes its plain files), stopped by
``train.max_steps``, rerun, resumed from the checkpoint, against one process with two devices.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

from absl import flags
import jax
import numpy as np
import pytest

from experiments import common
from nao_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120  # per run; a hung child fails the test instead of the session

CHILD = textwrap.dedent('''
    import sys
    from absl import flags
    from experiments import common
    _OUT = flags.DEFINE_string('out', None, 'npz written by every process')
    _DEVICES = flags.DEFINE_integer('devices', None, 'expected global device count')
    common.setup(common.parse_flags(sys.argv))

    import jax, jax.numpy as jnp, numpy as np
    jax.config.update('jax_disable_most_optimizations', True)
    from nao_jax import parallel, spaces
    from nao_jax.controller import (ControllerConfig, capacity_for, init_controller,
                                    normalize_targets, pad_pool, train_epochs)

    mesh = parallel.data_mesh()
    assert mesh.size == _DEVICES.value, jax.devices()
    result = {'process_count': np.int32(jax.process_count())}

    def host_value(x):  # a replicated global array, as numpy on this host
      return np.asarray(x.addressable_data(0))

    # The controller: same pool on every host (drawn from one seed), minibatches split on 'data'.
    space = spaces.WS_SPACE
    cfg = ControllerConfig.for_space(space, hidden_size=16, mlp_layers=1, mlp_hidden=16,
                                     batch_size=16, mlp_dropout=0.0)
    rng = np.random.default_rng(0)
    archs = space.sample(rng, 40)
    targets, _ = normalize_targets(rng.random(40), True)
    data = pad_pool(space.to_tokens(archs), targets, capacity_for(40, 16))
    swaps = space.swap_permutations().astype(np.int32)
    state = parallel.replicate(init_controller(cfg, jax.random.key(0)), mesh)
    inputs = parallel.replicate((*data, swaps, np.int32(3), jax.random.key(1)), mesh)
    state, stats = train_epochs(state, cfg, *inputs, mesh=mesh)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
      result['controller' + jax.tree_util.keystr(path)] = host_value(leaf)
    result['controller_loss'] = host_value(stats['loss'])

    # Data-parallel SGD on a linear model: each host feeds only its rows of the global batch.
    rng = np.random.default_rng(1)
    x_all = rng.normal(size=(5, 32, 6)).astype(np.float32)
    y_all = (x_all @ rng.normal(size=(6, 1)) + 0.1 * rng.normal(size=(5, 32, 1))).astype(np.float32)

    @jax.jit
    def sgd_step(w, x, y):
      loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
      return w - 0.1 * grad, loss

    w = parallel.replicate(np.zeros((6, 1), np.float32), mesh)
    rows = parallel.host_batch_slice(32, mesh)
    for step in range(5):
      x, y = parallel.global_batch((x_all[step, rows], y_all[step, rows]), mesh)
      assert x.shape == (32, 6) and x.sharding.spec == parallel.batch_sharding(mesh).spec
      w, loss = sgd_step(w, x, y)
    result['sgd_w'] = host_value(w)
    result['sgd_loss'] = host_value(loss)
    np.savez(_OUT.value, **result)
    print('done', jax.process_index(), flush=True)
''')


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  for proxy in [k for k in env if k.lower().endswith('_proxy')]:  # gRPC to localhost
    del env[proxy]
  return env


def _run_all(commands: list[list[str]], env: dict, tmp_path) -> list[str]:
  """Runs the commands concurrently; all are killed if one fails or the time runs out."""
  logs = [open(tmp_path / f'log{i}.txt', 'w+') for i in range(len(commands))]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
           for cmd, log in zip(commands, logs)]
  deadline = time.monotonic() + TIMEOUT_S
  timed_out = False
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break  # done, or one failed: the others would wait for it until their own timeouts
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    codes = [p.poll() for p in procs]  # before the kill: who failed by itself
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  if timed_out:
    pytest.fail(f'timed out after {TIMEOUT_S} s (children killed); output of the first:\n'
                + outputs[0][-4000:])
  for i, (code, out) in enumerate(zip(codes, outputs)):
    assert code in (None, 0), f'process {i} exited with status {code}:\n' + out[-4000:]
  return outputs


@pytest.mark.parametrize('local_devices', [1, 2])
def test_two_processes_equal_one(tmp_path, local_devices):
  """2 processes x ``local_devices`` CPU devices against 1 process x ``2 * local_devices``.

  With one device per process the gradient all-reduce adds two partial sums, in either order the
  same float, and the runs are bit-identical. With two devices per process gloo adds four partial
  sums in another order than the single-process CPU all-reduce: after nine Adam steps most
  parameters differ in the last bits (measured: about 1% of the tolerance ``1e-6 + 1e-5 |x|``).
  """
  child = tmp_path / 'child.py'
  child.write_text(CHILD)
  port = _free_port()
  start = time.monotonic()
  single = tmp_path / 'single.npz'
  multi = [tmp_path / f'process{i}.npz' for i in range(2)]
  devices = f'--devices={2 * local_devices}'
  # The reference runs first, alone: two concurrent jobs already share the 2-core CI machine.
  _run_all([[sys.executable, str(child), f'--out={single}', devices]], _env(2 * local_devices),
           tmp_path)
  reference_s = time.monotonic() - start
  _run_all([[sys.executable, str(child), f'--out={multi[i]}', devices, '--distributed',
             f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}']
            for i in range(2)], _env(local_devices), tmp_path)
  print(f'reference {reference_s:.1f} s, two processes {time.monotonic() - start - reference_s:.1f} s')

  expected = dict(np.load(single))
  assert expected.pop('process_count') == 1
  assert any(k.startswith('controller[') for k in expected)
  for path in multi:
    got = dict(np.load(path))
    assert got.pop('process_count') == 2
    assert sorted(got) == sorted(expected)
    exact = [k for k in expected if np.array_equal(got[k], expected[k])]
    worst = max(float(np.max(np.abs(got[k] - v) / (1e-6 + 1e-5 * np.abs(v))))
                for k, v in expected.items())
    print(f'{path.name}: {len(exact)} of {len(expected)} arrays bit-identical; largest '
          f'difference {worst:.2f} of the tolerance 1e-6 + 1e-5 |x|')
    for key, value in expected.items():
      if local_devices == 1:
        np.testing.assert_array_equal(got[key], value, err_msg=key)
      else:
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  # Training moved the parameters (the comparison is not between two initialisations).
  assert float(expected['controller_loss']) > 0 and np.abs(expected['sgd_w']).max() > 0.1


# -- the shared launcher flags ---------------------------------------------------------------------


_SHARED = ('distributed', 'coordinator_address', 'num_processes', 'process_id')


@pytest.fixture
def shared_flags():
  """Sets the shared launcher flags (others keep their values); restores them afterwards.

  Values are set rather than parsed: in a full test session ``flags.FLAGS`` also holds the
  required flags of whichever launchers other tests imported.
  """
  was_parsed = flags.FLAGS.is_parsed()
  saved = {name: flags.FLAGS[name].value for name in _SHARED}

  def set_flags(**values):
    flags.FLAGS.mark_as_parsed()
    for name in _SHARED:
      flags.FLAGS[name].value = values.get(name, flags.FLAGS[name].default)
    return ['prog']

  yield set_flags
  for name, value in saved.items():
    flags.FLAGS[name].value = value
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_setup_initializes_distributed_from_flags(shared_flags, monkeypatch):
  calls = []
  monkeypatch.setattr(parallel, 'initialize_distributed', lambda *a: calls.append(a))
  common.setup(shared_flags(distributed=True, coordinator_address='10.0.0.1:1234',
                            num_processes=2, process_id=1))
  assert calls == [('10.0.0.1:1234', 2, 1)]
  common.setup(shared_flags(distributed=True))  # TPU pod / SLURM: everything discovered
  assert calls[-1] == (None, None, None)
  common.setup(shared_flags())
  assert len(calls) == 2


@pytest.mark.parametrize('values, message', [
    ({'process_id': 0}, '--process_id given without --distributed'),
    ({'distributed': True, 'num_processes': 2, 'process_id': 2}, 'must be below --num_processes=2'),
])
def test_setup_refuses_inconsistent_flags(shared_flags, monkeypatch, values, message):
  monkeypatch.setattr(parallel, 'initialize_distributed', lambda *a: pytest.fail('initialized'))
  with pytest.raises(SystemExit) as exit_info:
    common.setup(shared_flags(**values))
  assert message in str(exit_info.value)


@pytest.mark.parametrize('before, after', [(None, 'gloo'), ('mpi', 'mpi')])
def test_initialize_distributed_picks_gloo_unless_chosen(monkeypatch, before, after):
  seen = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: seen.append(
      (jax.config.jax_cpu_collectives_implementation, kw)))
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update('jax_cpu_collectives_implementation', before)
  try:
    parallel.initialize_distributed('localhost:1', 2, 0)
  finally:
    jax.config.update('jax_cpu_collectives_implementation', previous)
  assert seen == [(after, {'coordinator_address': 'localhost:1', 'num_processes': 2,
                           'process_id': 0})]


# -- a launcher with one shared run directory --------------------------------------------------------


# train_cifar's tiny variant on a cell that compiles fast (tests/test_train_cifar.py's cheap cell),
# 4 channels, no drop-path, 96 synthetic training images: 2 epochs of 6 steps of batch 16.
_CHEAP_CELL = '0 2 1 3 2 4 0 2 1 3 3 2 4 4 0 3 5 0 1 4'
_TRAIN_CIFAR = ['-m', 'experiments.train_cifar',
                '--config=experiments/configs/naonet_a_cifar10.py:tiny', '--config.arch=',
                f'--config.arch_string={_CHEAP_CELL} {_CHEAP_CELL}', '--config.space=cnn_ws',
                '--config.model.channels=4', '--config.model.drop_path_keep=1.0',
                '--config.data.synthetic_train=96', '--config.data.synthetic_test=32']


def _distributed(port: int, i: int) -> list[str]:
  return ['--distributed', f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={i}']


def _no_stray_files(workdir, launches: int) -> None:
  """Nothing half-written; one TensorBoard event file per launch (the primary's), not two."""
  names = [os.path.join(root, name) for root, _, files in os.walk(workdir) for name in files]
  assert not [n for n in names if '.tmp' in n], names
  assert len(os.listdir(workdir / 'tb')) == launches, os.listdir(workdir / 'tb')


def test_train_cifar_two_processes_share_a_workdir_and_resume(tmp_path):
  """2 processes x 1 device, one ``--workdir``: stopped at step 8, rerun, resumed from step 8.

  The reference is the uninterrupted command in 1 process with 2 (fake) devices, the same mesh;
  with one device per process every all-reduce adds the same two partial sums, so the final
  test accuracy and loss are equal floats (as in ``test_two_processes_equal_one``). About 75 s
  on a loaded 2-core machine (three launches, four Python processes).
  """
  # The resumed run reads its compiled programs from the persistent cache of the stopped one.
  env = dict(_env(1), JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  reference, shared = tmp_path / 'reference', tmp_path / 'shared'
  start = time.monotonic()
  _run_all([[sys.executable, *_TRAIN_CIFAR, f'--workdir={reference}']],
           dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'), tmp_path)
  reference_s = time.monotonic() - start

  port = _free_port()
  _run_all([[sys.executable, *_TRAIN_CIFAR, f'--workdir={shared}', '--config.train.max_steps=8',
             *_distributed(port, i)] for i in range(2)], env, tmp_path)
  stopped_s = time.monotonic() - start - reference_s
  assert sorted(os.listdir(shared / 'checkpoints')) == ['6', '8']
  assert not (shared / 'metrics.json').exists()
  _no_stray_files(shared, launches=1)

  port = _free_port()
  outputs = _run_all([[sys.executable, *_TRAIN_CIFAR, f'--workdir={shared}',
                       *_distributed(port, i)] for i in range(2)], env, tmp_path)
  print(f'reference {reference_s:.1f} s, two processes to step 8 {stopped_s:.1f} s, resumed '
        f'{time.monotonic() - start - reference_s - stopped_s:.1f} s')
  for out in outputs:
    assert f'resuming {shared} from step 8 ' in out, out[-4000:]
    assert 'finished: test accuracy' in out
  _no_stray_files(shared, launches=2)
  with open(shared / 'metrics.json', encoding='utf-8') as f:
    got = json.load(f)
  with open(reference / 'metrics.json', encoding='utf-8') as f:
    expected = json.load(f)
  assert got['finished'] and got['step'] == expected['step'] == 12
  for key in ('test_accuracy', 'test_loss', 'test_count', 'params', 'arch'):
    assert got[key] == expected[key], key
  assert (shared / 'config.json').read_text() == (reference / 'config.json').read_text()
