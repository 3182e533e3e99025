"""Language-model training (``nao_jax.rnn.lm``), the WS-RNN evaluator and the NAO-WS PTB search.

Everything runs on a toy corpus in PTB format written to a temporary folder, at the sizes of the
configs' ``tiny`` variants, so the compiled programs are shared between tests. (Token counts of
the real PTB / WikiText-2 files are checked in ``tests/test_data_text.py``.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import nao_ws_ptb, naonet_ptb
from nao_jax.checkpoint import RunCheckpointer
from nao_jax.rnn import lm
from nao_jax.rnn import train as train_lib
from nao_jax.rnn import ws_evaluator
from nao_jax.search import run_search
from nao_jax.spaces import RNN_WS_SPACE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  """A PTB-style corpus: 30 words, lines of a few arithmetic progressions (learnable)."""
  path = tmp_path_factory.mktemp('toy_ptb')
  rng = np.random.default_rng(0)
  words = [f'w{i}' for i in range(30)]
  for split, lines in (('train', 110), ('valid', 30), ('test', 30)):
    with open(path / f'ptb.{split}.txt', 'w') as f:
      for _ in range(lines):
        first, stride, length = rng.integers(30), rng.integers(1, 4), rng.integers(4, 15)
        f.write(' ' + ' '.join(words[(first + stride * k) % 30] for k in range(length)) + ' \n')
  return str(path)


def lm_config(corpus_dir, variant='tiny', **train):
  config = naonet_ptb.get_config(variant)
  config.data_dir = corpus_dir
  config.train.epochs = 4
  config.log_every_steps = 4
  config.train.update(train)
  return config


def comparable(metrics):
  return {k: v for k, v in metrics.items() if k not in ('wall_s', 'train_tok_per_s', 'config')}


def restore(workdir, subdir):
  """The newest checkpoint of ``workdir/subdir`` as host arrays (keys as key data)."""
  checkpointer = RunCheckpointer(workdir, subdir=subdir)
  step = checkpointer.latest_step()
  checkpointer.close()
  path = os.path.join(workdir, subdir, str(step), 'state')
  return step, ocp.PyTreeCheckpointer().restore(path)


# -- train_lm -------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted_across_the_nt_asgd_switch(corpus_dir, tmp_path):
  # The official recipe with a short non-monotone window: averaging starts during the run, so
  # the resumed run must also restore the switch, the running average and the valid history.
  config = lm_config(corpus_dir, 'official,tiny', nonmono=1, lr=60.0, epochs=5)
  whole = lm.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert whole['finished'] and whole['asgd_start_epoch'] is not None
  assert np.isfinite(whole['valid_ppl']) and np.isfinite(whole['test_ppl'])
  # A kill mid-epoch after the switch: the checkpoint holds the window, the hidden state, the
  # running average and the valid history.
  stop = whole['steps'] - 4
  config.train.max_steps = stop
  parts = str(tmp_path / 'parts')
  partial = lm.train_and_evaluate(config, parts)
  assert not partial['finished'] and partial['step'] == stop and partial['window'] > 0
  assert partial['epoch'] >= whole['asgd_start_epoch']
  config.train.max_steps = 0
  resumed = lm.train_and_evaluate(config, parts)
  assert comparable(resumed) == comparable(whole)
  for subdir in ('checkpoints', 'best'):
    step_a, a = restore(str(tmp_path / 'whole'), subdir)
    step_b, b = restore(parts, subdir)
    assert step_a == step_b
    chex.assert_trees_all_equal(a, b)  # bit-identical, NT-ASGD average included
  assert json.load(open(os.path.join(parts, 'metrics.json')))['test_ppl'] == whole['test_ppl']
  # A finished run directory answers from metrics.json.
  assert comparable(lm.train_and_evaluate(config, parts)) == comparable(whole)
  evaluated = lm.evaluate_checkpoint(None, parts)
  assert evaluated['valid_ppl'] == pytest.approx(whole['valid_ppl'], rel=1e-6)


@pytest.mark.parametrize('rollback_to', ['last', 'best'])
def test_a_non_finite_loss_rolls_back_to_a_good_checkpoint(corpus_dir, tmp_path, monkeypatch,
                                                           rollback_to):
  real_step = train_lib.train_step
  calls = []

  def faulty_step(state, *args, **kwargs):
    state, hidden, metrics = real_step(state, *args, **kwargs)
    calls.append(int(state.step))
    if len(calls) == 20:  # once, in the second epoch: the loss goes NaN
      metrics = dict(metrics, loss=metrics['loss'] * np.nan)
    return state, hidden, metrics

  config = lm_config(corpus_dir, epochs=2, rollback_to=rollback_to)
  cfg = lm.resolve_config(config)
  first_epoch = len(lm.epoch_windows(cfg, len(lm.load_data(cfg)[1]), 0, 0))
  assert first_epoch + 2 < 20 < 2 * first_epoch
  # Checkpoints: the end of epoch 1 (also the best-valid state) and 2 steps into epoch 2.
  config.checkpoint_every_steps = first_epoch + 2
  monkeypatch.setattr(train_lib, 'train_step', faulty_step)
  metrics = lm.train_and_evaluate(config, str(tmp_path))
  assert metrics['finished'] and metrics['rollbacks'] == 1
  assert np.isfinite(metrics['valid_ppl'])
  # 'last' went back to the mid-epoch checkpoint; 'best' to the end of epoch 1 (the reference),
  # discarding the newer checkpoint; then epoch 2 was trained again.
  restart = first_epoch + 2 if rollback_to == 'last' else first_epoch
  assert calls.count(restart + 1) == 2 and calls.count(restart) == 1


def test_divergence_stops_after_max_rollbacks_and_keeps_the_good_checkpoint(corpus_dir, tmp_path,
                                                                           monkeypatch):
  real_step = train_lib.train_step

  def huge_lr_step(state, inputs, targets, hidden, rng, lr_scale, *args, **kwargs):
    # The rate multiplier is data: a huge rate without compiling another step.
    return real_step(state, inputs, targets, hidden, rng, lr_scale * np.float32(1e30), *args,
                     **kwargs)

  monkeypatch.setattr(train_lib, 'train_step', huge_lr_step)
  config = lm_config(corpus_dir, max_rollbacks=1)
  with pytest.raises(lm.DivergenceError, match=r'after 1 rollback.*last good checkpoint is '
                     r'step 0 in .*checkpoints; lower train.lr'):
    lm.train_and_evaluate(config, str(tmp_path))
  step, arrays = restore(str(tmp_path), 'checkpoints')
  assert step == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(arrays['train'])
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_bad_configs_fail_before_any_work(corpus_dir, tmp_path):
  cases = [
      ({'model': {'width': 3}}, 'unknown config key model.width'),
      ({'arch': 'NAONet-X'}, 'unknown built-in architecture'),
      ({'arch': 'NAONet-A'}, 'not an RNN cell'),
      ({'arch': '', 'arch_string': '0 1 0 1', 'space': 'rnn_ws'}, 'expected 22 integers'),
      ({'arch': '', 'arch_string': '0 1 ' * 11, 'space': 'cnn_ws'}, 'arch_string needs space'),
      ({'train': {'schedule': 'cosine'}}, 'train.schedule'),
      ({'model': {'emb_size': 12}}, 'tied'),
      ({'data_dir': str(tmp_path / 'missing')}, 'not found'),
  ]
  for overrides, message in cases:
    config = lm_config(corpus_dir).to_dict()
    for key, value in overrides.items():
      if isinstance(value, dict):
        config[key].update(value)
      else:
        config[key] = value
    workdir = tmp_path / 'run'
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      lm.train_and_evaluate(config, str(workdir))
    assert not (workdir / 'checkpoints').exists()


def test_launcher_errors_are_one_line_with_nonzero_exit(corpus_dir, tmp_path):
  base = [sys.executable, '-m', 'experiments.train_lm',
          '--config=experiments/configs/naonet_ptb.py:tiny', f'--config.data_dir={corpus_dir}']
  cases = {
      'key': (['--config.model.width=3'], 'config.model.width=3: no such config key'),
      'string': (['--config.arch=', '--config.arch_string=0 1 9', '--config.space=rnn_ws'],
                 'rnn_ws: expected 22 integers'),
      'data': ([f'--config.data_dir={tmp_path}/missing'], 'Corpus directory not found'),
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  processes = {name: subprocess.Popen(base + extra + [f'--workdir={tmp_path / name}'], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
               for name, (extra, _) in cases.items()}
  for name, process in processes.items():
    _, err = process.communicate(timeout=180)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert process.returncode != 0, err
    assert lines[-1].startswith('error: ') and cases[name][1] in lines[-1], err[-2000:]
    assert not any('Traceback' in line for line in lines), err[-2000:]
    assert not (tmp_path / name / 'checkpoints').exists()


# -- the WS-RNN evaluator --------------------------------------------------------------------------


def ws_config(corpus_dir, **overrides) -> dict:
  config = nao_ws_ptb.get_config('tiny').to_dict()
  config['ws_rnn'].update(data_dir=corpus_dir, train_tokens=0, valid_tokens=0, **overrides)
  return config


_COMPILES = []


def _count_compiles(event: str, duration: float, **_) -> None:
  del duration
  if event == '/jax/core/compile/backend_compile_duration':
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def test_pool_scored_in_one_call_equals_one_by_one_without_recompiling(corpus_dir):
  evaluator = ws_evaluator.from_config(ws_config(corpus_dir))
  pool = RNN_WS_SPACE.sample(np.random.default_rng(0), 6)
  evaluator.train_epochs_until(pool, 1)  # trained weights: architectures score differently
  together = evaluator.score(pool)
  alone = np.concatenate([evaluator.score(a[None]) for a in pool])
  np.testing.assert_array_equal(together, alone)
  assert len(set(together.tolist())) == len(pool)
  records = evaluator.evaluate(pool)
  assert [r['score'] for r in records] == together.tolist()
  assert evaluator.higher_is_better is False and evaluator.score_name == 'valid_nll'
  before = len(_COMPILES)
  for seed in (1, 2):  # new architectures, new pool sizes: the same program
    other = RNN_WS_SPACE.sample(np.random.default_rng(seed), 3 + seed)
    assert np.all(np.isfinite(evaluator.score(other)))
  assert len(_COMPILES) == before
  # The reference's window: a start row in [0, rows / bptt), per architecture.
  reference = ws_evaluator.from_config(ws_config(corpus_dir, score_window='reference'))
  starts = reference.score_starts(pool)
  assert starts.shape == (6, 1) and np.all(starts < len(reference.valid_data) // 10)
  # Zeroing the carried state when the architecture changes is a different (finite) training.
  reset = ws_evaluator.from_config(ws_config(corpus_dir, reset_hidden_on_arch_change=True))
  reset.train_epochs_until(pool, 1)
  scores = reset.score(pool)
  assert np.all(np.isfinite(scores)) and not np.array_equal(scores, together)


def test_start_round_resumes_a_killed_round_exactly(corpus_dir, tmp_path, monkeypatch):
  config = ws_config(corpus_dir, epochs_per_round=2, checkpoint_every_steps=4)
  pool = RNN_WS_SPACE.sample(np.random.default_rng(0), 5)
  whole = ws_evaluator.from_config(config, str(tmp_path / 'whole'))
  whole.start_round(pool, 0)
  assert whole.epoch == 2 and whole.step > 10

  real_step = train_lib.train_step
  calls = []

  def killed_at_step_11(*args, **kwargs):
    calls.append(1)
    if len(calls) == 11:
      raise KeyboardInterrupt('killed')
    return real_step(*args, **kwargs)

  monkeypatch.setattr(train_lib, 'train_step', killed_at_step_11)
  killed = ws_evaluator.from_config(config, str(tmp_path / 'parts'))
  with pytest.raises(KeyboardInterrupt):
    killed.start_round(pool, 0)
  monkeypatch.setattr(train_lib, 'train_step', real_step)

  resumed = ws_evaluator.from_config(config, str(tmp_path / 'parts'))  # a new process
  assert resumed.step == 8 and resumed.epoch == 0  # the mid-round checkpoint
  resumed.start_round(pool, 0)
  assert (resumed.step, resumed.epoch) == (whole.step, whole.epoch)
  chex.assert_trees_all_equal(jax.device_get(resumed.state['train']),
                              jax.device_get(whole.state['train']))
  np.testing.assert_array_equal(resumed.score(pool), whole.score(pool))
  # The round is done: calling it again trains nothing; another pool for it is refused.
  again = ws_evaluator.from_config(config, str(tmp_path / 'parts'))
  again.start_round(pool, 0)
  assert again.step == whole.step
  with pytest.raises(ValueError, match='different pool'):
    again.start_round(pool[::-1], 0)


def test_tiny_nao_ws_ptb_search_end_to_end(corpus_dir, tmp_path):
  config = ws_config(corpus_dir)
  results = run_search(config, str(tmp_path))
  assert results['finished'] and results['score_name'] == 'valid_nll'
  assert results['higher_is_better'] is False and results['rounds'] == 2
  arch = RNN_WS_SPACE.parse(results['best_arch'])  # a valid official rnn_ws string
  assert RNN_WS_SPACE.format(arch) == results['best_arch']
  with open(tmp_path / 'history.jsonl') as f:
    history = [json.loads(line) for line in f]
  scores = [r for r in history if r.get('kind') == 'score']
  assert sorted({r['round'] for r in scores}) == [0, 1, 2]
  assert min(r['score'] for r in scores if r['round'] == 2) == results['best_score']
  assert (tmp_path / 'supernet').is_dir() and results['drawings']


# -- a preemption notice --------------------------------------------------------------------------


def _launch_slow_train_lm(corpus_dir, tmp_path, workdir, started) -> subprocess.Popen:
  """``experiments.train_lm`` on ``lm_config(epochs=2)``, slowed so that a signal lands mid-run.

  From its 4th window on, the launcher's process sleeps 0.3 s per window (and says so by
  creating ``started``): an epoch of 16 windows then takes about 4 s.
  """
  config_file = tmp_path / 'tiny_slow.py'
  config_file.write_text(
      'import os, sys, time\n'
      f'sys.path.insert(0, {os.path.join(ROOT, "tests")!r})\n'
      'from test_lm import lm_config\n'
      'from nao_jax.data import text\n'
      'get_batch, calls = text.get_batch, []\n'
      'def slow_get_batch(*args):\n'
      '  calls.append(1)\n'
      '  if len(calls) >= 4:\n'
      f'    open({str(started)!r}, "w").close()\n'
      '    time.sleep(0.3)\n'
      '  return get_batch(*args)\n'
      'text.get_batch = slow_get_batch\n'
      f'def get_config():\n  return lm_config({corpus_dir!r}, epochs=2)\n')
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.train_lm', f'--config={config_file}',
       f'--workdir={workdir}'], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='true'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_same_run(a, b) -> None:
  """The newest regular and best-valid checkpoints of two run directories are equal."""
  for subdir in ('checkpoints', 'best'):
    step_a, state_a = restore(str(a), subdir)
    step_b, state_b = restore(str(b), subdir)
    assert step_a == step_b
    chex.assert_trees_all_equal(state_a, state_b)


def test_sigterm_mid_epoch_checkpoints_the_window_and_rerun_equals_uninterrupted(corpus_dir,
                                                                                 tmp_path, caplog):
  """SIGTERM train_lm mid-epoch: a checkpoint of the window reached, one line, exit 143; then a
  SIGKILL after the first epoch: the rerun resumes from its checkpoint. Both end as one run."""
  config = lm_config(corpus_dir, epochs=2)
  whole = lm.train_and_evaluate(config, str(tmp_path / 'whole'))
  preempted = tmp_path / 'preempted'
  started = tmp_path / 'started'
  proc = _launch_slow_train_lm(corpus_dir, tmp_path, preempted, started)
  deadline = time.time() + 120
  while not started.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  last = err.strip().splitlines()[-1]
  step = int(last.split()[3].rstrip(':'))
  assert last == (f'preempted at step {step}: checkpoint saved; rerun the same command to '
                  'resume'), err[-2000:]
  checkpointer = RunCheckpointer(str(preempted))
  assert checkpointer.latest_step() == step
  meta = checkpointer.restore_meta(step)
  checkpointer.close()
  assert (meta['epoch'], meta['window']) == (0, step) and step >= 3  # mid-epoch
  assert not (preempted / 'metrics.json').exists()
  resumed = lm.train_and_evaluate(config, str(preempted))  # the rerun, in this process
  assert comparable(resumed) == comparable(whole)
  _assert_same_run(tmp_path / 'whole', preempted)

  # SIGKILL (no notice) once the epoch-1 checkpoint exists, 4 s before the run could end: the
  # rerun resumes from it and ends as the uninterrupted run.
  killed, started = tmp_path / 'killed', tmp_path / 'started_killed'
  proc = _launch_slow_train_lm(corpus_dir, tmp_path, killed, started)
  deadline = time.time() + 120
  while not (killed / 'checkpoints' / '16').exists() and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL and not (killed / 'metrics.json').exists()
  caplog.set_level(logging.INFO, logger='absl')
  resumed = lm.train_and_evaluate(config, str(killed))
  assert f'resuming {killed} from step 16 ' in caplog.text
  assert comparable(resumed) == comparable(whole)
  _assert_same_run(tmp_path / 'whole', killed)
