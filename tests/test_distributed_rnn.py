"""The WS-RNN supernet evaluator data parallel over two CPU processes, as over two devices of one.

``experiments.search`` with the toy NAO-WS PTB config (``nao_ws_ptb.py:tiny``: a 16-unit
supernet, batch 8, scoring batch 8, one 14-window epoch per round, 2 proposal rounds) on a toy
corpus, once in 1 process with 2 (fake) devices and once in 2 processes x 1 device sharing one
``--workdir``. Both runs have the same 2-device mesh: each device trains 4 of the 8 columns of
every window (and carries their 4 rows of the hidden state) and scores 4 of the 8 validation
columns, so every gradient and score all-reduce adds the same two partial sums, in either order
the same float. The 2-process run is SIGKILLed after a mid-epoch supernet checkpoint and rerun:
it restores the gathered hidden state split over the processes again. The history (every
score), the result and the newest supernet checkpoint are equal to the uninterrupted run's.
"""

import json
import os
import sys
import time
import types

import jax
import numpy as np
import pytest

from tests.test_distributed import _distributed, _env, _free_port, _run_all, _write_corpus

# Supernet checkpoints at steps 16 (epoch 2, window 2: mid round 1), 28 (round 1's end), 32, 42.
_COMMAND = [sys.executable, '-m', 'experiments.search',
            '--config=experiments/configs/nao_ws_ptb.py:tiny',
            '--config.ws_rnn.checkpoint_every_steps=16']


def _read(workdir) -> tuple[list, dict]:
  """history.jsonl and results.json without the fields that measure time."""
  with open(workdir / 'history.jsonl', encoding='utf-8') as f:
    history = [{k: v for k, v in json.loads(line).items() if k not in ('time', 'cost', 'wall_s')}
               for line in f]
  with open(workdir / 'results.json', encoding='utf-8') as f:
    results = {k: v for k, v in json.load(f).items() if k != 'wall_s'}
  return history, results


def _newest_supernet(workdir) -> tuple[int, dict]:
  """The newest step of ``workdir/supernet`` as host arrays (read without a device mesh)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  folder = workdir / 'supernet'
  step = max(int(name) for name in os.listdir(folder) if name.isdigit())
  return step, ocp.PyTreeCheckpointer().restore(str(folder / str(step) / 'state'))


def test_ws_rnn_search_over_two_processes_killed_and_resumed_equals_one(tmp_path):
  """About 75 s on a loaded 2-core machine (three launches, five Python processes)."""
  corpus = _write_corpus(tmp_path / 'corpus')
  # The resumed launch reads its compiled programs from the persistent cache of the killed one.
  env = dict(_env(1), JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  command = [*_COMMAND, f'--config.ws_rnn.data_dir={corpus}']
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  start = time.monotonic()
  (single_out,) = _run_all([[*command, f'--workdir={single}']],
                           dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
                           tmp_path)
  single_s = time.monotonic() - start
  # Both runs split the training and the scoring columns over the same 2 devices.
  assert 'scoring batch 8, on 2 device(s) of 1 process(es)' in single_out, single_out[-4000:]

  def launch(**kwargs) -> list[str]:
    port = _free_port()
    return _run_all([[*command, f'--workdir={multi}', *_distributed(port, i)]
                     for i in range(2)], env, tmp_path, **kwargs)

  # Killed once step 16 is on disk (Orbax renames a complete step into place): the next
  # checkpoint is 12 training steps later, far more than the 0.2 s until the kill.
  launch(kill_when=lambda: (multi / 'supernet' / '16').is_dir())
  assert not (multi / 'results.json').exists() or not json.loads(
      (multi / 'results.json').read_text())['finished']
  killed_s = time.monotonic() - start - single_s
  outputs = launch()
  print(f'1 process {single_s:.1f} s; 2 processes: killed after {killed_s:.1f} s, resumed '
        f'{time.monotonic() - start - single_s - killed_s:.1f} s')
  for out in outputs:
    assert 'scoring batch 8, on 2 device(s) of 2 process(es)' in out, out[-4000:]
    assert 'supernet resumed at step 16 (epoch 2, window 2, round 1)' in out, out[-4000:]
    assert 'best valid_nll' in out, out[-4000:]

  history, results = _read(single)
  scores = [r for r in history if r.get('kind') == 'score']
  assert sorted({r['round'] for r in scores}) == [0, 1, 2]
  # Trained weights: the architectures of a round score differently (not a comparison of inits).
  assert len({r['score'] for r in scores if r['round'] == 2}) > 1
  assert results['finished'] and results['score_name'] == 'valid_nll'
  assert _read(multi) == (history, results)

  (step, expected), (step_b, got) = _newest_supernet(single), _newest_supernet(multi)
  assert step == step_b == 42
  assert got['hidden'].shape == expected['hidden'].shape == (8, 16)  # all rows, gathered
  assert np.abs(expected['hidden']).max() > 0  # a carried state, not the zeros of an epoch start
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # Only process 0 wrote TensorBoard (one event file per launch) and nothing is half-written.
  assert len(os.listdir(multi / 'tb' / 'supernet')) == 2
  assert not [n for root, _, files in os.walk(multi) for n in files if '.tmp' in n]


def test_ws_rnn_refuses_a_batch_that_does_not_divide_over_the_devices(tmp_path, monkeypatch):
  from experiments.configs import nao_ws_ptb  # pylint: disable=import-outside-toplevel
  from nao_jax import parallel  # pylint: disable=import-outside-toplevel
  from nao_jax.rnn import ws_evaluator  # pylint: disable=import-outside-toplevel
  config = nao_ws_ptb.get_config('tiny').to_dict()
  # No corpus there: the refusal comes before the corpus is read.
  config['ws_rnn']['data_dir'] = str(tmp_path / 'missing')
  # A mesh of 3 devices (only its size is read before the refusal).
  monkeypatch.setattr(parallel, 'data_mesh', lambda: types.SimpleNamespace(size=3))
  with pytest.raises(ValueError, match=r'ws_rnn.batch_size = 8 does not divide over the 3 '
                     r'devices of the data mesh'):
    ws_evaluator.from_config(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
