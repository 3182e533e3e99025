"""Data parallel on 8 fake CPU devices equals a single device.

Each check runs in a subprocess, because the fake devices must be configured before JAX starts.
"""

import os
import subprocess
import sys
import textwrap

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
