"""Final CIFAR training (nao_jax.cnn.final) and its launchers: resume, NaN guard, evaluation,
schedules, data position, one-line errors.

One tiny network (N=1, F=4, a cell of pools, identities and one separable conv) on 96 training
images (the shared CIFAR-10 subset when ``NAO_DATA_DIR`` is set, else synthetic), batch 16:
6 steps per epoch, 2 epochs. Runs in one process share the compiled step (``build_program`` is
cached), so most tests cost steps, not compilations. Drop-path is off here: its 50 random draws
triple the step's compile time on XLA:CPU; its masks come from the same ``fold_in(rng, step)`` key
as the augmentation and dropout, whose resume these tests check (the SIGKILL test, opt-in, runs
the tiny variant with drop-path on).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import naonet_a_cifar10
from nao_jax.checkpoint import RunCheckpointer
from nao_jax.cnn import final

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 5-op space: n2 = avg3(h0) + max3(h1); n3 = id(n2) + avg3(h0); n4 = max3(h1) + avg3(n3);
# n5 = id(n4) + max3(h0); n6 = sep3(n5) + id(h1) -- cheap to compile, all kinds of branch.
CHEAP_CELL = '0 2 1 3 2 4 0 2 1 3 3 2 4 4 0 3 5 0 1 4'
CHEAP_ARCH = f'{CHEAP_CELL} {CHEAP_CELL}'
STEPS_PER_EPOCH, EPOCHS = 6, 2


def tiny_config(**train):
  """The tiny variant of the NAONet-A config on the cheap cell; ``train`` overrides train.*."""
  config = naonet_a_cifar10.get_config('tiny')
  config.arch, config.arch_string, config.space = '', CHEAP_ARCH, 'cnn_ws'
  config.model.channels = 4
  config.model.drop_path_keep = 1.0
  npz = os.path.join(os.environ.get('NAO_DATA_DIR', ''), 'cifar10', 'cifar10_subset_uint8.npz')
  if os.environ.get('NAO_DATA_DIR') and os.path.exists(npz):
    config.data.source, config.data.path = 'npz', npz
  else:
    config.data.source = 'synthetic'
    config.data.synthetic_train, config.data.synthetic_test = 96, 40
  config.data.train_subset = 96
  config.train.epochs = EPOCHS
  config.train.batch_size = 16
  config.train.eval_batch_size = 32  # 40 or 500 test images: the last batch is padded
  config.log_every_steps = 4
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 4
  config.train.update(train)
  return config


def restore_params(workdir, step=None):
  checkpointer = RunCheckpointer(workdir)
  step = checkpointer.latest_step() if step is None else step
  template = _restore_template(workdir)
  state, meta = checkpointer.restore(step, template)
  checkpointer.close()
  return state, meta


def _restore_template(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = final.resolve_config(json.load(f))
  data = final.load_data(cfg)
  program = final.build_program(cfg, data.num_classes, len(data.x_train), data.mean, data.std)
  return program.init(jax.random.key(cfg.seed))


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """An uninterrupted tiny run: (workdir, metrics)."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, final.train_and_evaluate(tiny_config(), workdir)


# -- schedules ------------------------------------------------------------------------------------


def _sgdr_reference(epoch, lr_max, lr_min, t0, t_mul):
  """SGDR as the TF code steps it (spec §6.5 notes): restart when T_cur reaches T_i."""
  t_cur, t_i = 0, t0
  for _ in range(epoch):
    t_cur += 1
    if t_cur >= t_i:
      t_cur, t_i = 0, t_i * t_mul
  return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_cur / t_i))


def test_lr_schedules_match_spec_formulas():
  # Single-period cosine, 0.024 -> 0 over 600 epochs (seed / TF-NAO; PT CosineAnnealingLR).
  cosine = final.sgdr_lr(np.array([0, 1, 150, 300, 599]), 0.024, 0.0, 600, 1)
  expected = [0.024 * 0.5 * (1 + math.cos(math.pi * e / 600)) for e in (0, 1, 150, 300, 599)]
  np.testing.assert_allclose(cosine, expected, rtol=1e-6, atol=1e-9)
  assert cosine[0] == pytest.approx(0.024) and cosine[3] == pytest.approx(0.012)
  # SGDR 0.05 -> 1e-4, T_0 = 10, T_mul = 2 (TF-WS): restarts at epochs 10, 30, 70, 150, 310.
  epochs = np.array([0, 5, 9, 10, 20, 29, 30, 69, 70, 310, 629])
  sgdr = final.sgdr_lr(epochs, 0.05, 1e-4, 10, 2)
  np.testing.assert_allclose(sgdr, [_sgdr_reference(int(e), 0.05, 1e-4, 10, 2) for e in epochs],
                             rtol=1e-6, atol=1e-8)
  assert sgdr[3] == pytest.approx(0.05) and sgdr[8] == pytest.approx(0.05)  # restarts
  # Traced (inside the step) and host values agree; the rate is constant within an epoch.
  cfg = final.resolve_config(tiny_config(lr_schedule='sgdr', sgdr_t0=1, lr_max=0.05, lr_min=1e-4))
  schedule = final.make_schedule(cfg.train, steps_per_epoch=10)
  counts = np.arange(0, 20)
  host = schedule(counts)
  traced = jax.jit(schedule)(jnp.asarray(counts))
  np.testing.assert_allclose(np.asarray(traced), host, rtol=1e-6)
  assert len(set(host[:10].tolist())) == 1 and host[0] == pytest.approx(0.05)
  assert host[10] == pytest.approx(_sgdr_reference(1, 0.05, 1e-4, 1, 2))


# -- data position --------------------------------------------------------------------------------


def test_data_position_resumes_exactly():
  batcher = final.EpochBatcher(num_examples=100, batch_size=16, seed=3)
  assert batcher.steps_per_epoch == 6  # drop_remainder: 4 images of each epoch's order left out
  straight = [batcher.indices(s) for s in range(20)]
  # A fresh batcher (a restarted process) at any position serves the same batches.
  for s in (0, 5, 6, 13, 19):
    resumed = final.EpochBatcher(100, 16, seed=3)
    np.testing.assert_array_equal(resumed.indices(s), straight[s])
    assert resumed.position(s) == (s // 6, s % 6)
  epoch0 = np.concatenate(straight[:6])
  assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
  assert not np.array_equal(straight[0], straight[6])  # a new order every epoch
  assert not np.array_equal(final.EpochBatcher(100, 16, seed=4).indices(0), straight[0])


# -- resume ---------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(straight_run, tmp_path):
  workdir, metrics = straight_run
  assert metrics['finished'] and metrics['step'] == STEPS_PER_EPOCH * EPOCHS
  resumed = str(tmp_path / 'resumed')
  # Stop mid-epoch (with a checkpoint), as a preemption would.
  stopped = final.train_and_evaluate(tiny_config(max_steps=7), resumed)
  assert not stopped['finished'] and stopped['step'] == 7
  assert not os.path.exists(os.path.join(resumed, 'metrics.json'))
  _, meta = restore_params(resumed, 7)
  assert (meta['epoch'], meta['batch_in_epoch']) == (1, 1)
  # A kill loses the steps after the newest checkpoint: drop it, so the rerun starts at step 4.
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '7'))
  checkpointer = RunCheckpointer(resumed)
  assert checkpointer.latest_step() == 4
  checkpointer.close()
  again = final.train_and_evaluate(tiny_config(), resumed)
  assert again['finished']
  for key in ('test_accuracy', 'test_loss', 'test_count', 'step'):
    assert again[key] == metrics[key], key
  state_a, _ = restore_params(workdir)
  state_b, _ = restore_params(resumed)
  assert_trees_equal(state_a, state_b)  # params, BN statistics, momentum, step, key
  # A finished run directory is not trained again.
  assert final.train_and_evaluate(tiny_config(), resumed)['test_accuracy'] == again['test_accuracy']


def test_resume_refuses_a_different_config(straight_run):
  workdir, _ = straight_run
  with pytest.raises(ValueError, match='train.lr_max'):
    final.train_and_evaluate(tiny_config(lr_max=0.1), workdir)


# -- evaluation -----------------------------------------------------------------------------------


def test_evaluate_checkpoint_reproduces_final_accuracy(straight_run):
  workdir, metrics = straight_run
  with open(os.path.join(workdir, 'metrics.json')) as f:
    written = json.load(f)
  assert written['test_accuracy'] == metrics['test_accuracy']
  assert written['params']['total'] > written['params']['without_aux'] > 0
  scored = final.evaluate_checkpoint(None, workdir)  # the run's own config.json
  assert scored['step'] == metrics['step']
  assert scored['test_accuracy'] == metrics['test_accuracy']
  assert scored['test_loss'] == metrics['test_loss']
  assert scored['test_count'] == metrics['test_count']
  assert os.path.exists(os.path.join(workdir, f'eval_{metrics["step"]}.json'))
  # An older checkpoint (kept: keep_checkpoints=2) scores differently but works.
  older = final.evaluate_checkpoint(tiny_config(), workdir, step=metrics['step'] - 4)
  assert older['step'] == metrics['step'] - 4
  with pytest.raises(ValueError, match='no checkpoint of step 3'):
    final.evaluate_checkpoint(tiny_config(), workdir, step=3)


# -- divergence -----------------------------------------------------------------------------------


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  # lr 1e30 without clipping: the weights overflow within a few steps.
  config = tiny_config(lr_max=1e30, grad_clip=0.0)
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  workdir = str(tmp_path / 'nan')
  with pytest.raises(final.DivergenceError, match=r'training diverged: .* step \d+') as info:
    final.train_and_evaluate(config, workdir)
  checkpointer = RunCheckpointer(workdir)
  steps = checkpointer.all_steps()
  checkpointer.close()
  assert steps, 'no good checkpoint was written before the divergence'
  assert f'step {steps[-1]} in' in str(info.value)
  state, _ = restore_params(workdir)
  for leaf in jax.tree.leaves((state.train.params, state.train.batch_stats)):
    assert np.all(np.isfinite(leaf))


# -- launchers ------------------------------------------------------------------------------------


def _launch(*args, env=None):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def test_launcher_errors_are_one_line(tmp_path):
  tiny = 'experiments/configs/naonet_a_cifar10.py:tiny'
  cases = {
      'unknown arch': ([f'--config={tiny}', '--config.arch=NAONet-Z'], 'NAONet-Z'),
      'malformed string': ([f'--config={tiny}', '--config.arch=', '--config.space=cnn_ws',
                            '--config.arch_string=0 1 2'], 'cnn_ws'),
      'missing data': ([f'--config={tiny}', '--config.data.source=npz',
                        '--config.data.path=/nonexistent/cifar.npz'], '/nonexistent/cifar.npz'),
      'unknown key': ([f'--config={tiny}', '--config.train.lr_maxx=1'], 'lr_maxx'),
      'unknown variant': (['--config=experiments/configs/naonet_a_cifar10.py:huge'], 'huge'),
      'bad value': ([f'--config={tiny}', '--config.train.lr_schedule=step'], 'lr_schedule'),
  }
  procs = {}
  for name, (flags, _) in cases.items():
    workdir = str(tmp_path / name.replace(' ', '_'))
    procs[name] = (workdir, _launch('-m', 'experiments.train_cifar', f'--workdir={workdir}',
                                    *flags))
  evaluate = _launch('-m', 'experiments.evaluate_cifar', f'--workdir={tmp_path / "none"}')
  for name, (workdir, proc) in procs.items():
    _, stderr = proc.communicate(timeout=120)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert proc.returncode != 0, name
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, stderr)
    assert cases[name][1] in lines[0], (name, lines[0])
    assert not os.path.exists(workdir), f'{name}: work started'
  _, stderr = evaluate.communicate(timeout=120)
  assert evaluate.returncode != 0 and stderr.strip().startswith('error: ')
  assert len(stderr.strip().splitlines()) == 1


def test_final_configs_are_the_seed_recipe_plus_named_overrides():
  """Each final-training config changes the shared recipe only where its recipe differs, and a
  misspelled override is an error rather than a setting that nothing reads."""
  from experiments.configs import (cifar_common, lm_common, naonet_a128_cifar10,
                                   naonet_ws_cifar10, naonet_wt2)
  seed = cifar_common.final_config('NAONet-A', None).to_dict()
  assert naonet_a_cifar10.get_config().to_dict() == seed
  a128 = naonet_a128_cifar10.get_config().to_dict()
  assert a128['train']['drop_path_step_offset'] == 1 and a128['data']['cutout_style'] == 'pytorch'
  assert {k for k in a128['train'] if a128['train'][k] != seed['train'][k]} == set(
      cifar_common.PT_TRAIN)
  ws = naonet_ws_cifar10.get_config('tiny')
  assert ws.train.grad_clip == 0.0 and ws.model.layers == 1  # the variant still applies
  wt2 = naonet_wt2.get_config('official')
  assert wt2.dataset == 'wikitext2' and wt2.train.weight_decay == 5e-7 and wt2.train.lr == 20.0
  with pytest.raises(ValueError, match='unknown config key model.chanels; known at this level'):
    cifar_common.final_config('NAONet-A', None, model=dict(chanels=36))
  with pytest.raises(ValueError, match='unknown config key train.bptt_len; known at this level'):
    lm_common.final_config('NAONet-PTB', None, official_weight_decay=8e-7,
                           train=dict(bptt_len=70))


def test_tfds_error_names_the_requirements_file(monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  cfg = final.resolve_config(dict(data=dict(source='tfds')))
  with pytest.raises(ImportError, match='requirements-tfds.txt'):
    final.check_data(cfg)


# -- a real kill ----------------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get('NAO_SLOW_TESTS'),
                    reason='two fresh processes compile the step: set NAO_SLOW_TESTS=1')
def test_sigkill_and_rerun_equals_uninterrupted(straight_run, tmp_path):
  """SIGKILL the launcher after its first checkpoint, rerun the command, compare."""
  workdir, metrics = straight_run
  killed = str(tmp_path / 'killed')
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'))
  config_file = tmp_path / 'tiny_cheap.py'
  config_file.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
      'from test_train_cifar import tiny_config\n'
      'def get_config():\n  return tiny_config()\n')
  args = ('-m', 'experiments.train_cifar', f'--config={config_file}', f'--workdir={killed}')
  proc = _launch(*args, env=env)
  first = os.path.join(killed, 'checkpoints', '4')
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert os.path.isdir(first)
  rerun = _launch(*args, env=env)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-2000:]
  with open(os.path.join(killed, 'metrics.json')) as f:
    again = json.load(f)
  assert again['test_accuracy'] == metrics['test_accuracy']
  assert again['test_loss'] == metrics['test_loss']
  assert_trees_equal(restore_params(workdir)[0], restore_params(killed)[0])


# -- a preemption notice --------------------------------------------------------------------------


def test_sigterm_checkpoints_the_step_and_rerun_equals_uninterrupted(straight_run, tmp_path):
  """SIGTERM the launcher mid-epoch: it checkpoints the step it reached, says so, exits 143."""
  workdir, metrics = straight_run
  preempted = str(tmp_path / 'preempted')
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='true')
  config_file = tmp_path / 'tiny_slow.py'
  # Steps after the first checkpoint (step 4) sleep 0.3 s in the launcher's process, so the
  # notice lands mid-run instead of after the 12 steps of the tiny run have finished.
  config_file.write_text(
      'import sys, time\n'
      f'sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
      'from test_train_cifar import tiny_config\n'
      'from nao_jax.cnn import final\n'
      'indices = final.EpochBatcher.indices\n'
      'def slow_indices(self, step):\n'
      '  if step >= 4:\n'
      '    time.sleep(0.3)\n'
      '  return indices(self, step)\n'
      'final.EpochBatcher.indices = slow_indices\n'
      'def get_config():\n  return tiny_config()\n')
  proc = _launch('-m', 'experiments.train_cifar', f'--config={config_file}',
                 f'--workdir={preempted}', env=env)
  first = os.path.join(preempted, 'checkpoints', '4')
  deadline = time.time() + 120
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  last = err.strip().splitlines()[-1]
  step = int(last.split()[3].rstrip(':'))
  assert last == (f'preempted at step {step}: checkpoint saved; rerun the same command to '
                  'resume'), err[-2000:]
  assert 4 < step < STEPS_PER_EPOCH * EPOCHS
  checkpointer = RunCheckpointer(preempted)
  assert checkpointer.latest_step() == step
  checkpointer.close()
  assert not os.path.exists(os.path.join(preempted, 'metrics.json'))
  # The rerun (in this process: the compiled step is shared) resumes there and ends as the
  # uninterrupted run.
  again = final.train_and_evaluate(tiny_config(), preempted)
  assert again['finished']
  assert again['test_accuracy'] == metrics['test_accuracy']
  assert again['test_loss'] == metrics['test_loss']
  assert_trees_equal(restore_params(workdir)[0], restore_params(preempted)[0])
