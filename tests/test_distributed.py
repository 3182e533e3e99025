"""Two CPU processes over loopback train exactly as one process with the same devices.

Each child is a launcher-style program: it parses the shared flags of ``experiments/common.py``
and calls ``common.setup``, which with ``--distributed`` joins a ``jax.distributed`` run (gloo
CPU collectives, coordinator on localhost). It then trains on a data mesh over every device of
every process:

* the NAO controller (``train_epochs`` with ``mesh=``, a few epochs of Adam on a small pool);
* a jitted data-parallel SGD step whose batch is assembled from per-host slices with
  ``parallel.host_batch_slice`` and ``parallel.global_batch``.

The reference is the same program in one process with the same number of (fake) devices.

Launchers end to end: ``experiments.train_cifar`` (tiny variant, cheap cell) and
``experiments.train_lm`` (tiny variant, batch split on its columns) in two processes sharing one
``--workdir`` (only process 0 writes its plain files), stopped by ``train.max_steps``, rerun,
resumed from the checkpoint, against one process with two devices; then ``evaluate_cifar`` and
``train_lm --evaluate`` in two processes score the shared run directory.

The train-from-scratch evaluator: 3 candidates spread over two processes (candidate ``i`` on
process ``i mod 2``), every result on both, equal to one process; finished candidates are read,
never retrained, and a candidate resumes from the checkpoint its process wrote alone. In the
same children, NAO-WS re-ranking spreads its finalists the same way.

The tabular NAO search: its controller data parallel over 2 processes, SIGKILLed after its first
round and rerun, equal to one process uninterrupted.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import types
from typing import Callable

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


def _run_all(commands: list[list[str]], env: dict, tmp_path,
             kill_when: Callable[[], bool] | None = None) -> list[str]:
  """Runs the commands concurrently; all are killed if one fails or the time runs out.

  With ``kill_when``, every process is SIGKILLed as soon as it returns True (a preemption in
  the middle of the run; exit codes are then not checked).
  """
  logs = [open(tmp_path / f'log{i}.txt', 'w+') for i in range(len(commands))]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
           for cmd, log in zip(commands, logs)]
  deadline = time.monotonic() + TIMEOUT_S
  timed_out = killed = False
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break  # done, or one failed: the others would wait for it until their own timeouts
      if kill_when is not None and kill_when():
        killed = True
        break
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    codes = [p.poll() for p in procs]  # before the kill: who failed by itself
    if killed:
      codes = [None] * len(procs)
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


# 1 device per process is covered by the launcher tests below (train_cifar, train_lm, search).
@pytest.mark.parametrize('local_devices', [2])
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


def _evaluate_in_two_processes(command: list[str], workdir, env: dict, tmp_path) -> dict:
  """Runs an evaluation launcher in 2 processes on ``workdir``; returns what they printed.

  Both processes print the same JSON line, only process 0 writes it to ``eval_<step>.json``, and
  nothing is left half-written (the TensorBoard files are training's two launches).
  """
  port = _free_port()
  outputs = _run_all([[sys.executable, *command, f'--workdir={workdir}', *_distributed(port, i)]
                      for i in range(2)], env, tmp_path)
  scored = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  assert scored[0] == scored[1]
  assert scored[0] == json.loads((workdir / f'eval_{scored[0]["step"]}.json').read_text())
  _no_stray_files(workdir, launches=2)
  return scored[0]


def test_train_cifar_two_processes_share_a_workdir_and_resume(tmp_path):
  """2 processes x 1 device, one ``--workdir``: SIGKILLed once a checkpoint exists, rerun,
  resumed from the newest checkpoint.

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

  # The same config, but steps after the first epoch's checkpoint (step 6) sleep 2 s in each
  # process, so that the kill lands mid-run: the tiny run's remaining steps otherwise take less
  # than the 0.2 s between two looks at the run directory. The rerun is not slowed.
  slow_config = tmp_path / 'slow_tiny.py'
  slow_config.write_text(
      'import time\n'
      'from experiments.configs import naonet_a_cifar10\n'
      'from nao_jax.cnn import final\n'
      'indices = final.EpochBatcher.indices\n'
      'def slow_indices(self, step):\n'
      '  if step >= 6:\n'
      '    time.sleep(2.0)\n'
      '  return indices(self, step)\n'
      'final.EpochBatcher.indices = slow_indices\n'
      'def get_config():\n'
      '  return naonet_a_cifar10.get_config("tiny")\n')
  slow = [f'--config={slow_config}' if a.startswith('--config=') else a for a in _TRAIN_CIFAR]
  port = _free_port()
  _run_all([[sys.executable, *slow, f'--workdir={shared}', *_distributed(port, i)]
            for i in range(2)], env, tmp_path,
           kill_when=lambda: (shared / 'checkpoints' / '6').is_dir())
  stopped_s = time.monotonic() - start - reference_s
  assert not (shared / 'metrics.json').exists()  # killed before the end
  newest = max(int(n) for n in os.listdir(shared / 'checkpoints') if n.isdigit())
  assert newest == 6, newest

  port = _free_port()
  outputs = _run_all([[sys.executable, *_TRAIN_CIFAR, f'--workdir={shared}',
                       *_distributed(port, i)] for i in range(2)], env, tmp_path)
  print(f'reference {reference_s:.1f} s, two processes until killed {stopped_s:.1f} s, resumed '
        f'{time.monotonic() - start - reference_s - stopped_s:.1f} s')
  for out in outputs:
    assert f'resuming {shared} from step {newest} ' in out, out[-4000:]
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

  # experiments.evaluate_cifar in the same 2 processes: the final checkpoint scores what the
  # run reported.
  scored = _evaluate_in_two_processes(['-m', 'experiments.evaluate_cifar'], shared, env, tmp_path)
  assert scored['step'] == 12
  for key in ('test_accuracy', 'test_loss', 'test_count'):
    assert scored[key] == expected[key], key


# -- the language model: train_lm with one shared run directory ------------------------------------


def _write_corpus(path) -> str:
  """A PTB-style toy corpus (as tests/test_lm.py): 30 words in arithmetic progressions."""
  path.mkdir()
  rng = np.random.default_rng(0)
  words = [f'w{i}' for i in range(30)]
  for split, lines in (('train', 110), ('valid', 30), ('test', 30)):
    with open(path / f'ptb.{split}.txt', 'w', encoding='utf-8') as f:
      for _ in range(lines):
        first, stride, length = rng.integers(30), rng.integers(1, 4), rng.integers(4, 15)
        f.write(' ' + ' '.join(words[(first + stride * k) % 30] for k in range(length)) + ' \n')
  return str(path)


def _newest_checkpoint(workdir) -> tuple[int, dict]:
  """The newest step of ``workdir/checkpoints`` as host arrays (read without a device mesh)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  step = max(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  return step, ocp.PyTreeCheckpointer().restore(str(workdir / 'checkpoints' / str(step) /
                                                    'state'))


def test_train_lm_two_processes_share_a_workdir_and_resume(tmp_path):
  """``train_lm``'s tiny config (batch 8, 2 epochs of 16 windows; validation batch 10 split too,
  test batch 1 replicated) with the batch split over 2 processes x 1 device, stopped at step 20
  (mid epoch 2), rerun, resumed.

  The reference is the uninterrupted command in 1 process with 2 (fake) devices, the same mesh:
  each device trains 4 of the 8 columns, and the two partial gradient sums add in either order to
  the same float, so metrics.json (valid and test perplexities) and the last checkpoint are
  bit-identical. About 50 s on a loaded 2-core machine.
  """
  corpus = _write_corpus(tmp_path / 'corpus')
  env = dict(_env(1), JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  # Test batch 1 (the default recipe's): no split, every device scores all of it.
  command = [sys.executable, '-m', 'experiments.train_lm',
             '--config=experiments/configs/naonet_ptb.py:tiny', f'--config.data_dir={corpus}',
             '--config.train.test_batch_size=1']
  reference, shared = tmp_path / 'reference', tmp_path / 'shared'
  start = time.monotonic()
  _run_all([[*command, f'--workdir={reference}']],
           dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'), tmp_path)
  reference_s = time.monotonic() - start
  with open(reference / 'metrics.json', encoding='utf-8') as f:
    expected = json.load(f)
  assert expected['finished'] and expected['steps'] == 32, expected['steps']

  port = _free_port()
  outputs = _run_all([[*command, f'--workdir={shared}', '--config.train.max_steps=20',
                       *_distributed(port, i)] for i in range(2)], env, tmp_path)
  stopped_s = time.monotonic() - start - reference_s
  for out in outputs:
    assert 'batch 8 on 2 device(s)' in out, out[-4000:]
  assert sorted(os.listdir(shared / 'checkpoints')) == ['16', '20']
  assert not (shared / 'metrics.json').exists()
  _no_stray_files(shared, launches=1)

  port = _free_port()
  outputs = _run_all([[*command, f'--workdir={shared}', *_distributed(port, i)]
                      for i in range(2)], env, tmp_path)
  print(f'reference {reference_s:.1f} s, two processes to step 20 {stopped_s:.1f} s, resumed '
        f'{time.monotonic() - start - reference_s - stopped_s:.1f} s')
  for out in outputs:
    assert f'resuming {shared} from step 20 ' in out, out[-4000:]
    assert 'finished: best valid ppl' in out
  _no_stray_files(shared, launches=2)
  with open(shared / 'metrics.json', encoding='utf-8') as f:
    got = json.load(f)
  for key in ('wall_s', 'train_tok_per_s'):
    del got[key], expected[key]
  assert got == expected  # valid_nll, test_nll, best_epoch, ...: equal floats
  # Training moved the model: epoch 2 validated better than epoch 1.
  assert np.isfinite(got['test_nll']) and got['best_epoch'] == 2
  (step, a), (step_b, b) = _newest_checkpoint(reference), _newest_checkpoint(shared)
  assert step == step_b == 32
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert (shared / 'config.json').read_text() == (reference / 'config.json').read_text()

  # train_lm --evaluate in the same 2 processes: the best-valid state (epoch 2) scores the
  # reported perplexities.
  scored = _evaluate_in_two_processes(['-m', 'experiments.train_lm', '--evaluate'], shared, env,
                                      tmp_path)
  assert (scored['valid_nll'], scored['test_nll']) == (got['valid_nll'], got['test_nll'])


def test_train_lm_refuses_a_batch_that_does_not_divide_over_the_devices(tmp_path, monkeypatch):
  from experiments.configs import naonet_ptb  # pylint: disable=import-outside-toplevel
  from nao_jax.rnn import lm  # pylint: disable=import-outside-toplevel
  corpus = _write_corpus(tmp_path / 'corpus')
  config = naonet_ptb.get_config('tiny')
  config.data_dir = corpus
  # A mesh of 3 devices (only its size is read before the refusal).
  monkeypatch.setattr(parallel, 'data_mesh', lambda: types.SimpleNamespace(size=3))
  with pytest.raises(ValueError, match=r'train.batch_size = 8 does not divide over the 3 '
                     r'devices of the data mesh'):
    lm.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # refused before any work


# -- the train-from-scratch evaluator: candidates spread over processes ----------------------------


SCRATCH_CHILD = textwrap.dedent('''
    import json, os, sys
    from absl import flags
    from experiments import common
    _OUT = flags.DEFINE_string('out', None, 'JSON written by every process')
    _WORKDIR = flags.DEFINE_string('workdir', None, 'the shared search directory')
    _ARCHS = flags.DEFINE_string('archs', None, 'JSON list of cnn_ws architecture strings')
    common.setup(common.parse_flags(sys.argv))

    import jax, numpy as np
    jax.config.update('jax_disable_most_optimizations', True)
    from nao_jax.cnn import scratch_evaluator, standalone
    from nao_jax.spaces import WS_SPACE

    # tests/test_ws_search.py's tiny candidates: 1 cell per stage, 4 channels, 2 epochs of 2
    # steps of 32 synthetic 8x8 images (96 drawn, 32 of them held out to score).
    config = {'space': 'cnn_ws', 'seed': 0,
              'data': dict(source='synthetic', image_size=8, synthetic_train=96, num_dev=32,
                           mean_std_stats='train'),
              'scratch_cnn': dict(train=dict(layers=1, channels=4, epochs=2, batch_size=32,
                                             eval_batch_size=32, use_aux_head=False))}
    evaluator = scratch_evaluator.from_config(config, _WORKDIR.value)
    trained = []  # the candidates this process trains
    build = standalone.build_program

    def counting_build(space, arch, *args, **kwargs):
      trained.append(space.format(arch))
      return build(space, arch, *args, **kwargs)

    standalone.build_program = counting_build
    archs = [WS_SPACE.parse(a) for a in json.loads(_ARCHS.value)]
    first = evaluator.evaluate(np.stack(archs))
    trained_first = list(trained)
    # Reversed: in two processes each now reads results the other one trained; none retrains.
    again = evaluator.evaluate(np.stack(archs[::-1]))
    assert trained == trained_first, trained

    # A killed candidate resumes from the checkpoint its process wrote alone: candidate k (by
    # process k) again in a new folder, stopped after 3 of its 4 steps, then finished.
    k = jax.process_index()
    folder = os.path.join(_WORKDIR.value, f'resume{k}')
    train = lambda **kw: standalone.train_candidate(
        WS_SPACE, archs[k], evaluator.config, evaluator.data, folder, seed=0,
        device=jax.local_devices()[0], process_local=True, **kw)
    assert train(stop_after_steps=3) is None
    assert os.listdir(os.path.join(folder, 'checkpoints')) == ['step_3']
    resumed = train()

    # NAO-WS re-ranking spreads its finalists the same way; with the scratch recipe it trains
    # each exactly as the scratch evaluator did (same seed, data, program).
    from experiments.configs import nao_ws_cifar10
    from nao_jax.cnn import ws_evaluator
    ws_config = nao_ws_cifar10.get_config('tiny').to_dict()
    ws_config['ws_cnn']['rerank'] = dict(scratch_evaluator.TF_NAO_SEARCH_RECIPE,
                                         **config['scratch_cnn']['train'])
    ws = ws_evaluator.from_config(dict(config, ws_cnn=ws_config['ws_cnn']),
                                  os.path.join(_WORKDIR.value, 'ws'))
    del trained[:]
    reranked = ws.rerank(np.stack(archs))
    with open(_OUT.value, 'w') as f:
      json.dump({'process_count': jax.process_count(), 'archs': [WS_SPACE.format(a) for a in archs],
                 'first': first, 'again': again, 'trained': trained_first,
                 'resumed': resumed['valid_accuracy'], 'reranked': reranked,
                 'rerank_trained': list(trained)}, f)
    print('done', jax.process_index(), flush=True)
''')


# Three candidates of identity-only cells, wired two ways (a cell with pooling or separable
# convolutions compiles for 15 s to a minute here, an identity-only one in about 7 s).
_IDENTITY_CELLS = ('0 4 1 4 2 4 0 4 1 4 3 4 4 4 0 4 5 4 1 4',
                   '1 4 0 4 2 4 1 4 3 4 2 4 4 4 1 4 5 4 0 4')
_SCRATCH_ARCHS = [f'{_IDENTITY_CELLS[0]} {_IDENTITY_CELLS[0]}',
                  f'{_IDENTITY_CELLS[1]} {_IDENTITY_CELLS[1]}',
                  f'{_IDENTITY_CELLS[0]} {_IDENTITY_CELLS[1]}']


def test_local_checkpointer_keeps_the_newest_steps_and_restores_exactly(tmp_path):
  """The plain-file checkpoints a process writes alone (the scratch evaluator's candidates)."""
  from nao_jax.checkpoint import LocalCheckpointer  # pylint: disable=import-outside-toplevel
  device = jax.local_devices()[0]

  def state(step):
    return {'w': jax.device_put(np.arange(6, dtype=np.float32).reshape(2, 3) * step, device),
            'count': np.int32(step), 'rng': jax.random.fold_in(jax.random.key(0), step)}

  (tmp_path / 'checkpoints' / 'step_9.tmp').mkdir(parents=True)  # a save killed halfway
  checkpointer = LocalCheckpointer(str(tmp_path), max_to_keep=2)
  assert checkpointer.latest_step() is None and not os.listdir(tmp_path / 'checkpoints')
  for step in (1, 2, 3, 3):  # step 3 saved again (a replay): replaced
    checkpointer.save(step, state(step), {'step': step, 'evals': [0.5]})
  assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3
  template = {'w': jax.ShapeDtypeStruct((2, 3), np.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(device)),
              'count': np.int32(0), 'rng': jax.random.key(0)}
  restored, meta = checkpointer.restore(3, template)
  assert meta == {'step': 3, 'evals': [0.5]}
  assert restored['w'].sharding == template['w'].sharding
  np.testing.assert_array_equal(restored['w'], state(3)['w'])
  assert restored['count'] == 3 and restored['count'].dtype == np.int32
  np.testing.assert_array_equal(jax.random.key_data(restored['rng']),
                                jax.random.key_data(state(3)['rng']))
  checkpointer.delete(3)
  assert checkpointer.all_steps() == [2]
  with pytest.raises(ValueError, match='max_to_keep = 0'):
    LocalCheckpointer(str(tmp_path), max_to_keep=0)


def _candidate_folder(arch_string: str) -> str:
  """The folder of a ``cnn_ws`` candidate under ``candidates/``."""
  from nao_jax.cnn import standalone  # pylint: disable=import-outside-toplevel
  from nao_jax.spaces import WS_SPACE  # pylint: disable=import-outside-toplevel
  return os.path.basename(standalone.candidate_dir('', WS_SPACE, WS_SPACE.parse(arch_string)))


def test_scratch_evaluator_spreads_candidates_over_two_processes(tmp_path):
  """3 candidates: process 0 trains candidates 0 and 2, process 1 trains candidate 1, in one
  shared ``candidates/`` folder; both return all three results, equal to one process (2 devices,
  one candidate per device). About 40 s on a loaded 2-core machine.
  """
  child = tmp_path / 'scratch_child.py'
  child.write_text(SCRATCH_CHILD)
  env = dict(_env(1), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  reference, shared = tmp_path / 'reference', tmp_path / 'shared'
  start = time.monotonic()
  archs = f'--archs={json.dumps(_SCRATCH_ARCHS)}'
  _run_all([[sys.executable, str(child), f'--out={tmp_path / "single.json"}',
             f'--workdir={reference}', archs]],
           dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'), tmp_path)
  reference_s = time.monotonic() - start
  port = _free_port()
  _run_all([[sys.executable, str(child), f'--out={tmp_path / f"process{i}.json"}',
             f'--workdir={shared}', archs, *_distributed(port, i)] for i in range(2)], env,
           tmp_path)
  print(f'reference {reference_s:.1f} s, two processes '
        f'{time.monotonic() - start - reference_s:.1f} s')

  def load(name):
    with open(tmp_path / name, encoding='utf-8') as f:
      return json.load(f)

  single, multi = load('single.json'), [load(f'process{i}.json') for i in range(2)]
  archs = single['archs']
  assert archs == _SCRATCH_ARCHS and sorted(single['trained']) == sorted(archs)
  assert single['again'] == single['first'][::-1]
  # Candidate i trained on process i mod 2 only; both processes return every result, the same.
  assert [m['trained'] for m in multi] == [[archs[0], archs[2]], [archs[1]]]
  assert multi[0]['first'] == multi[1]['first'] and multi[0]['again'] == multi[1]['again']
  assert multi[0]['again'] == multi[0]['first'][::-1]

  def without_cost(records):
    return [{k: v for k, v in r.items() if k != 'cost'} for r in records]

  assert without_cost(multi[0]['first']) == without_cost(single['first'])
  # Re-ranking: finalist i on process i mod 2, every score on both, the scratch evaluator's.
  assert [m['rerank_trained'] for m in multi] == [[archs[0], archs[2]], [archs[1]]]
  assert without_cost(multi[0]['reranked']) == without_cost(multi[1]['reranked'])
  assert without_cost(multi[0]['reranked']) == without_cost(single['reranked'])
  assert [r['score'] for r in single['reranked']] == [r['score'] for r in single['first']]
  assert all(0.0 <= r['score'] <= 1.0 and r['params'] > 0 for r in single['first'])
  for arch in archs:  # the shared result.json files, written once by the training process
    name = _candidate_folder(arch)
    with open(shared / 'candidates' / name / 'result.json', encoding='utf-8') as f:
      got = json.load(f)
    with open(reference / 'candidates' / name / 'result.json', encoding='utf-8') as f:
      expected = json.load(f)
    assert got['valid_accuracy'] == expected['valid_accuracy'], arch
    assert got['train_loss'] == expected['train_loss'], arch
  # Candidate k resumed by process k from the checkpoint it wrote alone.
  for result, k in ((single, 0), (multi[0], 0), (multi[1], 1)):
    with open(reference / 'candidates' / _candidate_folder(archs[k]) / 'result.json',
              encoding='utf-8') as f:
      expected = json.load(f)
    assert result['resumed'] == expected['valid_accuracy']
  assert not [n for root, _, files in os.walk(shared) for n in files if '.tmp' in n]


SEARCH_CHILD = textwrap.dedent('''
    import sys
    from absl import flags
    from experiments import common
    _WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (shared by the processes)')
    _TABLE = flags.DEFINE_string('table', None, 'synthetic NAS-Bench-201 table')
    common.setup(common.parse_flags(sys.argv))

    import jax
    from absl import logging
    logging.set_verbosity(logging.INFO)  # the resume message
    jax.config.update('jax_disable_most_optimizations', True)
    from nao_jax.search import nao, run_search
    from nao_jax.controller import ControllerConfig
    from nao_jax import spaces

    assert jax.device_count() == 2, jax.devices()
    cfg = ControllerConfig.for_space(spaces.NB201_SPACE, hidden_size=16, mlp_layers=1,
                                     mlp_hidden=16, batch_size=20)
    assert nao._controller_mesh(cfg).size == 2  # the controller trains data parallel
    run_search({'space': 'nb201', 'evaluator': 'tabular', 'table': _TABLE.value,
                'searcher': 'nao', 'seed': 0, 'budget': 24, 'log_every': 1000,
                'nao': {'seed_pool_size': 8, 'top_k': 4, 'num_new': 4, 'eta_max': 6.0,
                        'eta_chunk': 3, 'pool_policy': 'keep_all', 'unlabeled': 6},
                'controller': {'epochs': 10, 'hidden_size': 16, 'mlp_layers': 1,
                               'mlp_hidden': 16, 'batch_size': 20}}, _WORKDIR.value)
    print('done', jax.process_index(), flush=True)
''')


def test_nao_search_trains_its_controller_over_two_processes_as_one(tmp_path):
  """A tabular NAO search whose controller is data parallel over 2 processes x 1 device, killed
  (SIGKILL, both processes) after its first proposal round and rerun, writes the same history
  and result as 1 process x 2 devices uninterrupted (two partial sums: the same floats)."""
  import itertools  # pylint: disable=import-outside-toplevel
  from nao_jax import spaces  # pylint: disable=import-outside-toplevel
  space = spaces.NB201_SPACE
  table = tmp_path / 'table.csv'
  with open(table, 'w') as f:
    f.write('arch_str,valid_accuracy\n')
    for arch in itertools.product(range(5), repeat=6):
      f.write(f'{space.format(np.asarray(arch))},{80 + 2 * arch.count(3) + 0.1 * arch[0]:.4f}\n')
  child = tmp_path / 'search_child.py'
  child.write_text(SEARCH_CHILD)
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  _run_all([[sys.executable, str(child), f'--workdir={single}', f'--table={table}']], _env(2),
           tmp_path)

  def queries(workdir) -> int:
    try:
      with open(workdir / 'history.jsonl', 'rb') as f:
        return f.read().count(b'\n')
    except FileNotFoundError:
      return 0

  def launch(**kwargs):
    port = _free_port()
    return _run_all([[sys.executable, str(child), f'--workdir={multi}', f'--table={table}',
                      *_distributed(port, i)] for i in range(2)], _env(1), tmp_path, **kwargs)

  # Seed pool of 8, then rounds of 4: killed once the first round's proposals are recorded.
  launch(kill_when=lambda: queries(multi) >= 12)
  assert 12 <= queries(multi) < 24, queries(multi)
  assert not (multi / 'results.json').exists() or not json.loads(
      (multi / 'results.json').read_text())['finished']
  outputs = launch()
  assert all('resuming the NAO search at round' in out for out in outputs), outputs[0][-4000:]

  def read(workdir):
    with open(workdir / 'history.jsonl') as f:
      history = [{k: v for k, v in json.loads(line).items() if k not in ('time', 'wall_s')}
                 for line in f]
    with open(workdir / 'results.json') as f:
      results = {k: v for k, v in json.load(f).items() if k != 'wall_s'}
    return history, results

  history, results = read(single)
  assert len(history) == 24 and any(r['source'] == 'nao' for r in history)
  assert read(multi) == (history, results)

