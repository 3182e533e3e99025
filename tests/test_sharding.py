"""Data parallel on 8 fake CPU devices equals a single device.

Each check runs in a subprocess, because the fake devices must be configured before JAX starts.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, devices: int = 8, timeout: int = 300) -> str:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  prelude = ("import jax\njax.config.update('jax_disable_most_optimizations', True)\n"
             f"assert jax.device_count() == {devices}, jax.devices()\n")
  result = subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


def test_controller_training_sharded_equals_single_device():
  out = run_with_devices('''
    import jax, jax.numpy as jnp, numpy as np
    from nao_jax import spaces
    from nao_jax.controller import (ControllerConfig, capacity_for, init_controller,
                                    normalize_targets, pad_pool, train_epochs)
    from nao_jax.parallel import data_mesh
    space = spaces.WS_SPACE
    cfg = ControllerConfig.for_space(space, hidden_size=16, mlp_layers=1, mlp_hidden=16,
                                     batch_size=16, mlp_dropout=0.0)
    rng = np.random.default_rng(0)
    archs = space.sample(rng, 40)
    targets, _ = normalize_targets(rng.random(40), True)
    data = pad_pool(space.to_tokens(archs), targets, capacity_for(40, 16))
    swaps = jnp.asarray(space.swap_permutations())
    results = []
    for mesh in (None, data_mesh()):
      state = init_controller(cfg, jax.random.key(0))
      state, stats = train_epochs(state, cfg, *data, swaps, jnp.int32(3), jax.random.key(1),
                                  mesh=mesh)
      results.append((state.params, float(stats['loss'])))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 results[0][0], results[1][0])
    print('loss', results[0][1], results[1][1])
  ''')
  assert 'loss' in out


def test_launchers_on_8_devices_equal_one_device(tmp_path):
  """``train_lm`` (tiny, batch 8: one column per device) on 8 fake devices ends as the same
  command on 1 device, up to the order of float sums (about 15 s on 2 cores). With
  ``NAO_SLOW_TESTS=1``, ``train_cifar`` (tiny, cheap cell, batch 16: 2 images per device) too,
  which should also match but does not yet (an expected failure, see below)."""
  import json  # pylint: disable=import-outside-toplevel
  from tests import test_distributed as dist  # pylint: disable=import-outside-toplevel
  corpus = dist._write_corpus(tmp_path / 'corpus')  # pylint: disable=protected-access
  # The CIFAR half reproduces a known defect (below); it runs with NAO_SLOW_TESTS=1, to keep
  # the suite within its time budget.
  with_cifar = bool(os.environ.get('NAO_SLOW_TESTS'))
  metrics = {}
  for devices in (1, 8):
    cifar, lm = tmp_path / f'cifar{devices}', tmp_path / f'lm{devices}'
    env = dict(dist._env(devices), JAX_DISABLE_MOST_OPTIMIZATIONS='true')  # pylint: disable=protected-access
    commands = [[sys.executable, '-m', 'experiments.train_lm',
                 '--config=experiments/configs/naonet_ptb.py:tiny', f'--config.data_dir={corpus}',
                 f'--workdir={lm}']]
    if with_cifar:
      commands.append([sys.executable, *dist._TRAIN_CIFAR, f'--workdir={cifar}'])  # pylint: disable=protected-access
    dist._run_all(commands, env, tmp_path)  # pylint: disable=protected-access
    metrics[devices] = [json.loads((run / 'metrics.json').read_text())
                        for run in ((lm, cifar) if with_cifar else (lm,))]
  lm1, lm8 = metrics[1][0], metrics[8][0]
  assert lm1['steps'] == lm8['steps'] == 32
  for key in ('valid_nll', 'test_nll'):
    np.testing.assert_allclose(lm8[key], lm1[key], rtol=1e-5, err_msg=key)
  if not with_cifar:
    return
  cifar1, cifar8 = metrics[1][1], metrics[8][1]
  assert cifar1['step'] == cifar8['step'] == 12
  if not np.isclose(cifar8['test_loss'], cifar1['test_loss'], rtol=1e-4):
    # Known, not yet explained (2026-11-29): the first step's loss and grad norm are the same
    # to every printed digit on 1, 2, 4 and 8 devices, and 2 and 4 devices stay equal to 1
    # device, but from step 2 on 8 devices drift (grad norm 6.766 vs 6.799 at step 2 with 2
    # images per device; 4.246 vs 4.244 with 8 per device) and end 7 % off in test loss after
    # 12 steps. Bisected so far: the 8-way gradient of this tiny network differs from one
    # device's by 2.6-3.5 % (global relative norm) for this cell, 0.4-1 % for cells of separable
    # convolutions only (library or shift primitives alike), 1e-6 for identity or pool cells;
    # every op alone at the network's shapes agrees to 1e-6; the compiled program partitions
    # the batch only (all-reduces, no halo exchange); the augmentation agrees exactly; with
    # XLA's optimisations on, the gap shrinks to 0.07 %.
    pytest.xfail(f'train_cifar on 8 devices drifts from 1 device: test loss '
                 f'{cifar8["test_loss"]:.4f} vs {cifar1["test_loss"]:.4f}')
  assert abs(cifar8['test_accuracy'] - cifar1['test_accuracy']) <= 1 / 32  # one image at most
