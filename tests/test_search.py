"""The search loop: budgets, baselines, NAO rounds, kill-and-resume, and bad input."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nao_jax import spaces
from nao_jax.data import nb201 as nb201_data
from nao_jax.search import TabularEvaluator, run_search
from nao_jax.search.history import History

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = spaces.NB201_SPACE

# A tiny NAO that finishes 40 queries in seconds.
TINY_NAO = {'seed_pool_size': 8, 'top_k': 4, 'num_new': 4, 'eta_max': 6.0, 'eta_chunk': 3,
            'pool_policy': 'keep_all', 'unlabeled': 12}
TINY_CONTROLLER = {'epochs': 15, 'hidden_size': 16, 'mlp_layers': 1, 'mlp_hidden': 16,
                   'batch_size': 20}


def synthetic_accuracy(arch) -> float:
  """A smooth, structured stand-in for NAS-Bench-201 accuracies (ties are rare)."""
  weights = np.array([0.0, 2.0, 3.0, 5.0, 1.0])  # none < pool < skip < 1x1 < 3x3
  position = np.arange(1, 7)
  return float(60 + weights[arch].sum() + 0.01 * (arch * position).sum() % 1.3)


@pytest.fixture(scope='module')
def table_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('nb201') / 'table.csv'
  with open(path, 'w') as f:
    f.write('index,arch_str,valid_accuracy,train_seconds\n')
    for i, arch in enumerate(itertools.product(range(5), repeat=6)):
      arch = np.asarray(arch)
      f.write(f'{i},{SPACE.format(arch)},{synthetic_accuracy(arch):.6f},{100 + i % 7}\n')
  return str(path)


def config(table, searcher='nao', budget=40, seed=0, **extra):
  values = {'space': 'nb201', 'evaluator': 'tabular', 'table': table, 'searcher': searcher,
            'seed': seed, 'budget': budget, 'log_every': 1000, 'nao': dict(TINY_NAO),
            'controller': dict(TINY_CONTROLLER),
            'evolution': {'population_size': 10, 'sample_size': 3}}
  values.update(extra)
  return values


def read_history(workdir):
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


def comparable(results):
  return {k: v for k, v in results.items() if k != 'wall_s'}


# -- the harness --------------------------------------------------------------------------------

@pytest.mark.parametrize('searcher', ['random', 'evolution', 'nao'])
def test_searchers_spend_exactly_the_budget_on_unseen_architectures(table_path, tmp_path, searcher):
  results = run_search(config(table_path, searcher), str(tmp_path))
  history = read_history(tmp_path)
  assert results['queries'] == len(history) == 40
  assert [r['query'] for r in history] == list(range(1, 41))
  assert len({r['arch'] for r in history}) == 40
  best = max(history, key=lambda r: r['score'])
  assert results['best_arch'] == best['arch'] and results['best_score'] == best['score']
  assert results['seed'] == 0 and results['config']['searcher'] == searcher
  assert results['finished'] and results['searcher'] == searcher
  for record in history:
    assert record['score'] == pytest.approx(synthetic_accuracy(SPACE.parse(record['arch'])), abs=1e-5)
  assert os.path.getsize(tmp_path / 'best_so_far.png') > 1000
  assert results['drawings'] == ['best_arch_cell.png', 'best_arch_cell.svg']
  assert os.path.getsize(tmp_path / 'best_arch_cell.png') > 1000
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'tb'))


def test_nao_rounds_use_the_controller_and_are_deterministic(table_path, tmp_path):
  first = run_search(config(table_path), str(tmp_path / 'a'))
  second = run_search(config(table_path), str(tmp_path / 'b'))
  assert comparable(first) == comparable(second)
  history = read_history(tmp_path / 'a')
  assert history == read_history(tmp_path / 'b')
  sources = [r['source'] for r in history]
  assert sources[:8] == ['pool'] * 8 and 'nao' in sources
  assert first['rounds'] == 8  # (40 - 8) / 4 new per round
  assert os.path.isdir(tmp_path / 'a' / 'search_state')


def test_mutation_and_screened_places_follow_their_rules(table_path, tmp_path):
  """``nao.mutations_per_round``: that many places per round go to one-edit neighbours of the
  round's seeds (the best ``top_k`` evaluated so far); ``nao.screened_per_round`` places go to
  random architectures at least ``screen_min_edits`` fields from the round's ``num_new`` best;
  the rest stay the embedding step's."""
  nao = dict(TINY_NAO, mutations_per_round=1, screened_per_round=1, screen_min_edits=3)
  results = run_search(config(table_path, nao=nao), str(tmp_path))
  history = read_history(tmp_path)
  assert results['queries'] == len(history) == 40 and len({r['arch'] for r in history}) == 40
  for round_index in range(results['rounds']):
    records = [r for r in history if r['round'] == round_index and r['source'] != 'pool']
    earlier = [r for r in history if r['query'] < records[0]['query']]
    ranked = [SPACE.parse(r['arch']) for r in sorted(earlier, key=lambda r: -r['score'])]
    sources = [r['source'] for r in records]
    assert len(records) == 4 and sources.count('nao') <= 2
    assert sources.count('mutation') >= 1 and sources.count('screened') == 1
    for record in records:
      arch = SPACE.parse(record['arch'])
      if record['source'] == 'mutation':
        assert min(np.sum(arch != seed) for seed in ranked[:TINY_NAO['top_k']]) == 1
      if record['source'] == 'screened':
        assert min(np.sum(arch != best) for best in ranked[:TINY_NAO['num_new']]) >= 3


@pytest.mark.parametrize('searcher', ['random', 'evolution', 'nao'])
def test_a_smaller_budget_is_a_prefix_of_a_larger_one(table_path, tmp_path, searcher):
  run_search(config(table_path, searcher, budget=20), str(tmp_path / 'short'))
  run_search(config(table_path, searcher, budget=40), str(tmp_path / 'long'))
  short, long = read_history(tmp_path / 'short'), read_history(tmp_path / 'long')
  assert short == long[:20]


def test_resuming_a_finished_run_evaluates_nothing_and_extending_the_budget_continues(
    table_path, tmp_path):
  first = run_search(config(table_path, 'evolution', budget=20), str(tmp_path))
  again = run_search(config(table_path, 'evolution', budget=20), str(tmp_path))
  assert comparable(first) == comparable(again)
  assert len(read_history(tmp_path)) == 20
  run_search(config(table_path, 'evolution', budget=30), str(tmp_path))
  fresh = tmp_path / 'fresh'
  run_search(config(table_path, 'evolution', budget=30), str(fresh))
  assert read_history(tmp_path) == read_history(fresh)


# -- kill -9 and resume --------------------------------------------------------------------------

def _launch(table_path, workdir, budget=40):
  args = [sys.executable, '-m', 'experiments.search', '--config=experiments/configs/nb201.py',
          f'--workdir={workdir}', f'--config.table={table_path}', f'--config.budget={budget}',
          '--config.log_every=1000']
  args += [f'--config.nao.{k}={v}' for k, v in TINY_NAO.items()]
  args += [f'--config.controller.{k}={v}' for k, v in TINY_CONTROLLER.items()]
  log = open(os.path.join(os.path.dirname(str(workdir)), 'launch.log'), 'ab')  # never a full pipe
  return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _lines(path):
  try:
    with open(path, 'rb') as f:
      return f.read().count(b'\n')
  except FileNotFoundError:
    return 0


def _file_config(table_path, budget=40):
  """The config the launcher builds from the config file and the flags of ``_launch``."""
  from experiments.configs import nb201 as nb201_config  # pylint: disable=import-outside-toplevel
  values = nb201_config.get_config().to_dict()
  values.update(table=table_path, budget=budget, log_every=1000)
  values['nao'].update(TINY_NAO)
  values['controller'].update(TINY_CONTROLLER)
  return values


def test_sigkill_and_rerun_equals_an_uninterrupted_run(table_path, tmp_path):
  reference = tmp_path / 'reference'
  run_search(_file_config(table_path), str(reference))
  workdir = tmp_path / 'killed'
  # Kill during the seed-pool evaluations, then in the middle of a later round.
  for kill_after in (3, 26):
    process = _launch(table_path, workdir)
    deadline = time.time() + 240
    while _lines(workdir / 'history.jsonl') < kill_after:
      assert process.poll() is None, 'the search ended before it could be killed'
      assert time.time() < deadline, 'the search made no progress'
      time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _lines(workdir / 'history.jsonl') < 40
  process = _launch(table_path, workdir)
  assert process.wait(timeout=300) == 0, (tmp_path / 'launch.log').read_text()[-3000:]
  assert read_history(workdir) == read_history(reference)
  with open(reference / 'results.json') as f, open(workdir / 'results.json') as g:
    assert comparable(json.load(f)) == comparable(json.load(g))


def test_torn_history_line_is_dropped_and_earlier_damage_refused(tmp_path):
  path = tmp_path / 'history.jsonl'
  path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
  history = History(str(path))
  assert [r['a'] for r in history] == [1, 2]
  history.append({'a': 3})
  history.close()
  assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'
  path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
  with pytest.raises(ValueError, match='history.jsonl:2 is not valid JSON'):
    History(str(path))


# -- bad input -----------------------------------------------------------------------------------

def _write(tmp_path, text):
  path = tmp_path / 'bad.csv'
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('text, match', [
    ('arch_str,accuracy\n', r"missing column\(s\) \['valid_accuracy'\]"),
    ('arch_str,valid_accuracy\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,1\n'
     '|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,2\n', 'bad.csv:3: duplicate architecture'),
    ('arch_str,valid_accuracy\n|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|,1\n',
     "bad.csv:2: cannot parse arch_str: nb201: unknown op 'conv'"),
    ('arch_str,valid_accuracy\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,high\n',
     "bad.csv:2: valid_accuracy = 'high' is not a number"),
    ('arch_str,valid_accuracy\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,nan\n',
     'is not finite'),
    ('arch_str,valid_accuracy\n', 'has no rows'),
])
def test_malformed_tables_are_rejected_with_the_line(tmp_path, text, match):
  with pytest.raises(ValueError, match=match):
    nb201_data.load_table(_write(tmp_path, text))


def test_bad_configs_fail_before_any_work(table_path, tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(FileNotFoundError, match='table not found'):
    run_search(config(str(tmp_path / 'missing.csv')), str(workdir))
  with pytest.raises(ValueError, match=r'budget 5 is smaller than the seed pool'):
    run_search(config(table_path, budget=5), str(workdir))
  with pytest.raises(ValueError, match=r"unknown nao config key\(s\) \['pool'\]"):
    run_search(config(table_path, nao={'pool': 3}), str(workdir))
  with pytest.raises(ValueError, match=r"unknown controller config key\(s\) \['hidden'\]"):
    run_search(config(table_path, controller={'hidden': 3}), str(workdir))
  with pytest.raises(ValueError, match='nao.unlabeled must be >= 0, got -1'):
    run_search(config(table_path, nao=dict(TINY_NAO, unlabeled=-1)), str(workdir))
  with pytest.raises(ValueError, match='nao.mutations_per_round must be >= 0, got -2'):
    run_search(config(table_path, nao=dict(TINY_NAO, mutations_per_round=-2)), str(workdir))
  with pytest.raises(ValueError, match='nao.screen_candidates must be >= 1, got 0'):
    run_search(config(table_path, nao=dict(TINY_NAO, screen_candidates=0)), str(workdir))
  with pytest.raises(ValueError, match="searcher = 'bayes'"):
    run_search(config(table_path, searcher='bayes'), str(workdir))
  assert not workdir.exists()


def test_an_incompatible_run_directory_is_refused(table_path, tmp_path):
  run_search(config(table_path, 'random', budget=5), str(tmp_path))
  with pytest.raises(ValueError, match="different config .*seed: 0 there, 1 now"):
    run_search(config(table_path, 'random', budget=5, seed=1), str(tmp_path))
  assert len(read_history(tmp_path)) == 5


def test_launcher_errors_are_one_line_with_nonzero_exit(tmp_path):
  base = [sys.executable, '-m', 'experiments.search', '--config=experiments/configs/nb201.py',
          f'--workdir={tmp_path}/run']
  cases = [
      (['--config.table=/nonexistent.csv'], 'table not found'),
      (['--config.no_such_key=1'], 'no_such_key'),
      (['--config.table=/nonexistent.csv', '--config.budget=3'], 'smaller than the seed pool'),
  ]
  for extra, match in cases:
    result = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if match in line]
    assert errors, result.stderr
  assert not os.path.exists(tmp_path / 'run' / 'history.jsonl')


def test_tabular_evaluator_reads_costs(table_path):
  evaluator = TabularEvaluator(nb201_data.load_table(table_path))
  record = evaluator.evaluate(SPACE.parse('|none~0|+|none~0|none~1|+|none~0|none~1|none~2|')[None])[0]
  assert record == {'score': pytest.approx(60.0), 'cost': 100.0}


def test_export_nb201_writes_a_table_the_loader_reads(tmp_path):
  from experiments import export_nb201  # pylint: disable=import-outside-toplevel

  class FakeApi:  # the two NATS-Bench calls the exporter uses
    archs = [SPACE.format(a) for a in SPACE.sample(np.random.default_rng(0), 30)]
    archs = sorted(set(archs))

    def __len__(self):
      return len(self.archs)

    def arch(self, index):
      return self.archs[index]

    def get_more_info(self, index, dataset, hp, is_random):
      assert (dataset, hp, is_random) == ('cifar10-valid', '200', False)
      return {'valid-accuracy': 50.0 + index, 'train-all-time': 10.0 * index}

  out = tmp_path / 'table.csv'
  rows = export_nb201.export_table(FakeApi(), 'cifar10-valid', '200', str(out))
  table = nb201_data.load_table(str(out))
  assert rows == len(table.archs) == len(FakeApi.archs)
  assert [SPACE.format(a) for a in table.archs] == FakeApi.archs
  np.testing.assert_allclose(table.accuracy, 50.0 + np.arange(rows))
  np.testing.assert_allclose(table.train_seconds, 10.0 * np.arange(rows))


# -- non-stationary evaluators (weight sharing) -------------------------------------------------

class FakeSupernet:
  """Scores that drift with the round, like a supernet's; ``rerank`` gives the true score."""
  space = SPACE
  higher_is_better = True
  score_name = 'fake_accuracy'
  stationary = False

  def __init__(self, crash_at_call=None):
    self.calls, self.crash_at_call, self.rounds_started = 0, crash_at_call, []

  def start_round(self, pool_archs, round_index):
    self.rounds_started.append((round_index, len(pool_archs)))

  def evaluate(self, archs):
    self.calls += 1
    if self.calls == self.crash_at_call:
      raise KeyboardInterrupt('simulated kill')
    drift = self.rounds_started[-1][0]  # state a real supernet restores from its checkpoint
    return [{'score': synthetic_accuracy(a) + 0.1 * ((a.sum() * 7 + drift) % 5)} for a in archs]

  def rerank(self, archs):
    return [{'score': synthetic_accuracy(a)} for a in archs]


def ws_config(table):
  values = config(table, budget=10**6)
  values['nao'].update(pool_policy='replace_worst', rounds=3, fill_with_random=False,
                       rerank_top=3)
  return values


def test_non_stationary_evaluator_rescores_the_pool_each_round_and_reranks(table_path, tmp_path):
  evaluator = FakeSupernet()
  results = run_search(ws_config(table_path), str(tmp_path), evaluator=evaluator)
  history = read_history(tmp_path)
  kinds = [r.get('kind') for r in history]
  assert kinds.count('score') == 4 * 8 and kinds.count('rerank') == 3
  assert [r for r, _ in evaluator.rounds_started] == [0, 1, 2, 3]
  assert all(size == 8 for _, size in evaluator.rounds_started)  # replace_worst keeps 8
  rounds = [{r['arch'] for r in history if r.get('kind') == 'score' and r['round'] == i}
            for i in range(4)]
  assert len(rounds[1] - rounds[0]) > 0  # proposals joined the pool and were scored next round
  reranked = [r for r in history if r.get('kind') == 'rerank']
  assert results['best_arch'] == max(reranked, key=lambda r: r['score'])['arch']
  assert results['rounds'] == 3


def test_non_stationary_search_resumes_after_a_crash(table_path, tmp_path):
  reference = run_search(ws_config(table_path), str(tmp_path / 'ref'), evaluator=FakeSupernet())
  workdir = str(tmp_path / 'crash')
  with pytest.raises(KeyboardInterrupt):
    run_search(ws_config(table_path), workdir, evaluator=FakeSupernet(crash_at_call=3))
  resumed = run_search(ws_config(table_path), workdir, evaluator=FakeSupernet())
  assert comparable(resumed) == comparable(reference)
  final = lambda h: [r for r in h if r.get('kind') in ('score', 'rerank') and r.get('round', 9) >= 2]
  assert final(read_history(workdir)) == final(read_history(tmp_path / 'ref'))
