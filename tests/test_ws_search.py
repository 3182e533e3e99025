"""NAO-WS on CNN cells end to end (supernet evaluator from a config, crash-resume, re-ranking),
the train-from-scratch evaluator, and bad search configs."""

import json
import os

import numpy as np
import pytest

from experiments.configs import nao_ws_cifar10
from nao_jax.cnn import scratch_evaluator, standalone, ws_evaluator
from nao_jax.data import search_split
from nao_jax.search import run_search
from nao_jax.spaces import WS_SPACE


def tiny_ws_config(**data):
  config = nao_ws_cifar10.get_config('tiny')
  config.nao.rerank_top = 1   # one stand-alone compile keeps the test short
  config.data.update(data)
  return config


def read_history(workdir):
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


class Crash(RuntimeError):
  pass


def test_ws_cnn_search_killed_mid_search_resumes_to_the_uninterrupted_result(tmp_path,
                                                                             monkeypatch):
  straight = run_search(tiny_ws_config(), str(tmp_path / 'straight'))
  # Every round's pool was scored by the supernet; the finalist was re-ranked stand-alone.
  history = read_history(tmp_path / 'straight')
  assert {r.get('kind') for r in history} >= {'rerank'}
  assert straight['best_arch'] == next(r['arch'] for r in history if r.get('kind') == 'rerank')
  assert straight['score_name'] == 'standalone_valid_accuracy'
  assert os.path.exists(tmp_path / 'straight' / 'best_arch_normal.svg')

  # A crash in the middle of round 1's supernet training (after a mid-round checkpoint) ...
  original = ws_evaluator.SupernetEvaluator.train_steps
  calls = {'n': 0}

  def crashing(self, pool_archs, num_steps, **kw):
    if self._round == 1 and num_steps > 0:
      calls['n'] += 1
      original(self, pool_archs, min(num_steps, 4), **kw)
      raise Crash('killed')
    return original(self, pool_archs, num_steps, **kw)

  monkeypatch.setattr(ws_evaluator.SupernetEvaluator, 'train_steps', crashing)
  workdir = str(tmp_path / 'resumed')
  with pytest.raises(Crash):
    run_search(tiny_ws_config(), workdir)
  assert calls['n'] == 1
  monkeypatch.setattr(ws_evaluator.SupernetEvaluator, 'train_steps', original)
  # ... and a rerun in the same directory ends exactly where the uninterrupted run did (CPU).
  resumed = run_search(tiny_ws_config(), workdir)
  assert resumed['best_arch'] == straight['best_arch']
  assert resumed['best_score'] == straight['best_score']
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ('time', 'cost', 'wall_s')}
                        for r in rows]
  assert strip(read_history(workdir)) == strip(history)


def test_bad_ws_configs_fail_before_any_work(tmp_path):
  cases = [
      (dict(ws_cnn=dict(epochs_per_rund=3)), 'epochs_per_rund'),
      (dict(ws_cnn=dict(supernet=dict(chanels=4))), 'chanels'),
      (dict(ws_cnn=dict(rerank=dict(score='median'))), 'score'),
      (dict(data=dict(source='imagenet')), 'imagenet'),
      (dict(data=dict(source='npz', path=str(tmp_path / 'missing.npz'))), 'does not exist'),
      (dict(data=dict(num_dev=10_000)), 'num_dev'),
  ]
  for i, (change, match) in enumerate(cases):
    config = tiny_ws_config().to_dict()
    for section, values in change.items():
      config[section] = {**config[section], **values}
    workdir = tmp_path / f'run{i}'
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      run_search(config, str(workdir))
    assert not (workdir / 'history.jsonl').exists()


def test_digits_and_synthetic_splits_are_deterministic_and_disjoint():
  a = search_split.load_search_data(dict(source='digits', image_size=8, num_dev=100))
  b = search_split.load_search_data(dict(source='digits', image_size=8, num_dev=100))
  assert a.x_train.shape == (1400, 8, 8, 3) and a.x_valid.shape == (100, 8, 8, 3)
  assert a.x_train.dtype == np.uint8 and a.num_classes == 10
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_valid, b.y_valid)
  rows = {x.tobytes() for x in a.x_train}
  assert sum(x.tobytes() in rows for x in a.x_valid) < 10   # digits has a few duplicate images
  assert set(np.unique(a.y_valid)) == set(range(10))
  with pytest.raises(ValueError, match='multiple of 8'):
    search_split.load_search_data(dict(source='digits', image_size=12))


def test_scratch_evaluator_trains_once_and_reads_finished_results(tmp_path, monkeypatch):
  config = {'space': 'cnn_ws', 'seed': 0,
            'data': dict(source='synthetic', image_size=8, synthetic_train=96, num_dev=32,
                         mean_std_stats='train'),
            'scratch_cnn': dict(train=dict(layers=1, channels=4, epochs=2, batch_size=32,
                                           eval_batch_size=32, use_aux_head=False))}
  evaluator = scratch_evaluator.from_config(config, str(tmp_path))
  assert evaluator.stationary and evaluator.higher_is_better
  # Identity-only cells: what is checked does not depend on the ops, and a cell of pools or
  # separable convolutions compiles for 15-60 s here, this one in a few seconds.
  identity_cell = '0 4 1 4 2 4 0 4 1 4 3 4 4 4 0 4 5 4 1 4'
  arch = WS_SPACE.parse(f'{identity_cell} {identity_cell}')
  [record] = evaluator.evaluate(arch[None])
  result = standalone.finished_result(
      standalone.candidate_dir(str(tmp_path / 'candidates'), WS_SPACE, arch))
  # The score is the best per-epoch dev accuracy (TF-NAO), evaluated every epoch.
  assert len(result['valid_accuracy']) == 2
  assert record['score'] == max(result['valid_accuracy']) == result['score']
  assert 0.0 <= record['score'] <= 1.0 and record['params'] > 0

  def no_training(*args, **kwargs):
    raise AssertionError('a finished candidate was trained again')

  monkeypatch.setattr(standalone, 'build_program', no_training)
  again = scratch_evaluator.from_config(config, str(tmp_path))
  assert again.evaluate(arch[None]) == [record]
  with pytest.raises(ValueError, match='scratch_cnn'):
    scratch_evaluator.from_config(dict(config, scratch_cnn=dict(trian={})), str(tmp_path))
