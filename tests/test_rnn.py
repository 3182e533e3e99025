"""Tests of the recurrent cell, language model and training step (tiny sizes)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nao_jax.data import text
from nao_jax.rnn import cell as cell_lib
from nao_jax.rnn import model as model_lib
from nao_jax.rnn import train as train_lib
from nao_jax.spaces import RNN_NAO_SPACE, RNN_WS_SPACE, get_builtin

E = H = 8
B = 3
T = 4
V = 50

_NP_ACTS = {
    'tanh': np.tanh,
    'relu': lambda v: np.maximum(v, 0.0),
    'identity': lambda v: v,
    'sigmoid': lambda v: 1.0 / (1.0 + np.exp(-v)),
}


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def numpy_step(w0, w, arch, activations, x, h, m_x, m_h, include_s0=False):
  """The cell equations of spec §2.4, written independently in float64 numpy."""
  hid = h.shape[-1]
  pre = np.concatenate([x * m_x, h * m_h], -1) @ w0
  states = [h + _sigmoid(pre[:, :hid]) * (np.tanh(pre[:, hid:]) - h)]
  for i, (p, a) in enumerate(arch):
    pre = (states[p] * m_h) @ w[i]
    states.append(states[p] + _sigmoid(pre[:, :hid]) *
                  (_NP_ACTS[activations[a]](pre[:, hid:]) - states[p]))
  return np.mean(states[0 if include_s0 else 1:], 0)


def _inputs(seed=0, steps=T):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  xs = jax.random.normal(keys[0], (steps, B, E))
  h0 = jax.random.normal(keys[1], (B, H))
  m_x = jax.random.bernoulli(keys[2], 0.6, (B, E)) / 0.6
  m_h = jax.random.bernoulli(keys[3], 0.6, (B, H)) / 0.6
  return xs, h0, m_x, m_h


def _ws_params_holding(fixed: dict, arch, seed=1) -> dict:
  """Random supernet weights with the fixed cell's W_i placed at the blocks ``arch`` selects."""
  ws = cell_lib.init_ws_cell(jax.random.PRNGKey(seed), E, H, 0.5)
  return {'w0': fixed['w0'], 'w': ws['w'].at[cell_lib.ws_block_index(arch)].set(fixed['w'])}


BUILTIN_ACTS = {
    'NAONet-PTB': ['relu', 'relu', 'relu', 'tanh', 'relu', 'relu', 'relu', 'relu', 'relu', 'relu',
                   'identity'],
    'NAONet-WS-PTB': ['relu', 'relu', 'sigmoid', 'sigmoid', 'relu', 'relu', 'relu', 'relu',
                      'sigmoid', 'tanh', 'relu'],
}


def test_param_count_nao_ptb_and_ws_supernet():
  key = jax.random.PRNGKey(0)
  ptb = jax.eval_shape(functools.partial(model_lib.init_params,
                                         config=model_lib.builtin_config('NAONet-PTB')), key)
  # 10000*850 embedding + 10000 bias + 1700*1700 W0 + 11*850*1700 W_i
  assert model_lib.param_count(ptb) == 27_295_000
  ws = jax.eval_shape(functools.partial(model_lib.init_params,
                                        config=model_lib.ws_search_config()), key)
  # 10000*300 + 10000 + 600*600 + 264 blocks * 300*600
  assert model_lib.param_count(ws) == 50_890_000
  assert ws['cell']['w'].shape == (264, 300, 600)


@pytest.mark.parametrize('name', sorted(BUILTIN_ACTS))
def test_builtin_decoding_uses_each_mapping(name):
  space, arch = get_builtin(name)
  plan = model_lib.builtin_config(name).plan()
  assert list(plan.acts) == BUILTIN_ACTS[name]
  assert plan.preds == tuple(arch[:, 0].tolist())
  assert sorted(n for _, nodes in plan.groups for n in nodes) == list(range(1, 12))
  # The other mapping would silently build a different network (spec §12 #1).
  other = RNN_WS_SPACE if space is RNN_NAO_SPACE else RNN_NAO_SPACE
  assert list(cell_lib.make_plan(arch, other.activations).acts) != BUILTIN_ACTS[name]


@pytest.mark.parametrize('name', sorted(BUILTIN_ACTS))
def test_cell_matches_numpy_reference(name):
  space, arch = get_builtin(name)
  params = cell_lib.init_fixed_cell(jax.random.PRNGKey(2), E, H, 0.5)
  xs, h0, m_x, m_h = _inputs()
  w0, w = (np.asarray(params[k], np.float64) for k in ('w0', 'w'))
  expected, h = [], np.asarray(h0, np.float64)
  for t in range(T):
    h = numpy_step(w0, w, arch.tolist(), space.activations, np.asarray(xs[t], np.float64), h,
                   np.asarray(m_x), np.asarray(m_h))
    expected.append(h)
  step = cell_lib.fixed_cell_step(params, arch, space.activations, xs[0], h0, m_x, m_h)
  np.testing.assert_allclose(step, expected[0], rtol=1e-5, atol=1e-6)
  plan = cell_lib.make_plan(arch, space.activations)
  fast = cell_lib.fixed_recurrence(params, plan, xs, h0, m_x, m_h)
  np.testing.assert_allclose(fast, np.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,output_average', [('NAONet-PTB', 'exclude_s0'),
                                                 ('NAONet-WS-PTB', 'include_s0')])
def test_fixed_and_ws_cells_agree_with_autodiff_reference(name, output_average):
  """Both fast paths (hand-written VJPs) against JAX autodiff of the plain step.

  The two cells use all four activations between them, each under its own id mapping.
  """
  space, arch = get_builtin(name)
  fixed = cell_lib.init_fixed_cell(jax.random.PRNGKey(4), E, H, 0.5)
  ws = _ws_params_holding(fixed, arch)
  xs, h0, m_x, m_h = _inputs(5)
  plan = cell_lib.make_plan(arch, space.activations, output_average)
  cot = jax.random.normal(jax.random.PRNGKey(6), (T, B, H))

  def reference(p, xs, h0):
    def step(h, x):
      h = cell_lib.fixed_cell_step(p, arch, space.activations, x, h, m_x, m_h, output_average)
      return h, h
    return jnp.sum(cot * jax.lax.scan(step, h0, xs)[1])

  def fixed_obj(p, xs, h0):
    return jnp.sum(cot * cell_lib.fixed_recurrence(p, plan, xs, h0, m_x, m_h))

  def ws_obj(p, xs, h0):
    return jnp.sum(cot * cell_lib.ws_recurrence(p, jnp.asarray(arch), space.activations, xs, h0,
                                                m_x, m_h, output_average))

  grad = lambda f, p: jax.value_and_grad(f, argnums=(0, 1, 2))(p, xs, h0)
  v_ref, g_ref = grad(reference, fixed)
  idx = np.asarray(cell_lib.ws_block_index(arch))
  v_ws, g_ws = grad(ws_obj, ws)
  for v, g in (grad(fixed_obj, fixed), (v_ws, g_ws)):
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    w = g[0]['w'] if g[0]['w'].shape[0] == cell_lib.STEPS else g[0]['w'][idx]
    np.testing.assert_allclose(w, g_ref[0]['w'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g[0]['w0'], g_ref[0]['w0'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-4, atol=1e-6)
  unused = np.setdiff1d(np.arange(cell_lib.num_ws_blocks()), idx)
  assert not np.any(g_ws[0]['w'][unused])  # only the chosen (node, pred, act) blocks learn


def test_ws_cell_does_not_recompile_across_architectures():
  params = cell_lib.init_ws_cell(jax.random.PRNGKey(0), E, H)
  xs, h0, m_x, m_h = _inputs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(params, arch):
    return cell_lib.ws_recurrence(params, arch, RNN_WS_SPACE.activations, xs, h0, m_x, m_h)

  archs = RNN_WS_SPACE.sample(np.random.default_rng(0), 20)
  outs = [run(params, a) for a in archs]
  assert run._cache_size() == 1
  assert len({np.asarray(o).tobytes() for o in outs}) == 20


def _toy_setup(config, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  stream = np.tile(rng.integers(0, V, 17), 12)  # periodic: learnable
  params = model_lib.init_params(jax.random.PRNGKey(seed), config)
  return text.batchify(stream, batch), params


def test_dropout_masks_and_regularisers():
  cfg = model_lib.builtin_config('NAONet-PTB', vocab_size=V, emb_size=E, hidden_size=H,
                                 dropoute=0.5)
  masks = model_lib.sample_masks(jax.random.PRNGKey(0), B, cfg)
  assert masks.words.shape == (V,) and masks.inputs.shape == (B, E)
  assert masks.hidden.shape == (B, H) and masks.outputs.shape == (B, H)
  assert set(np.unique(masks.words)) <= {0.0, 2.0}
  data, params = _toy_setup(cfg)
  inputs, targets = data[:T, :B], data[1:T + 1, :B]
  hidden = model_lib.init_hidden(B, cfg)
  out = model_lib.forward(params, inputs, hidden, config=cfg, rng=jax.random.PRNGKey(1))
  assert out.raw.shape == out.dropped.shape == (T, B, H)
  # Locked output dropout: one mask per column, the same at every step.
  zero = np.asarray(out.dropped == 0) & np.asarray(out.raw != 0)
  assert np.all(zero == zero[:1])
  evaluation = model_lib.forward(params, inputs, hidden, config=cfg)
  np.testing.assert_array_equal(evaluation.raw, evaluation.dropped)
  kwargs = dict(config=cfg, rng=jax.random.PRNGKey(1))
  plain, aux = model_lib.lm_loss(params, inputs, targets, hidden, tar_beta=0.0, **kwargs)
  with_tar, _ = model_lib.lm_loss(params, inputs, targets, hidden, tar_beta=1.0, **kwargs)
  tar = np.mean(np.square(np.diff(np.asarray(out.raw), axis=0)))
  np.testing.assert_allclose(plain, aux['nll'], rtol=1e-6)
  np.testing.assert_allclose(with_tar - plain, tar, rtol=1e-4)
  assert aux['hidden'].shape == (B, H)


def test_padded_window_equals_unpadded():
  cfg = model_lib.builtin_config('NAONet-WS-PTB', vocab_size=V, emb_size=E, hidden_size=H)
  data, params = _toy_setup(cfg)
  n = 3
  inputs, targets = data[:n, :B], data[1:n + 1, :B]
  padded_in, padded_tg, length = train_lib.pad_window(inputs, targets, pad_multiple=5)
  assert padded_in.shape == (5, B) and int(length) == n
  hidden = jax.random.normal(jax.random.PRNGKey(2), (B, H))
  kwargs = dict(config=cfg, rng=jax.random.PRNGKey(3))  # masks do not depend on T
  grad_fn = jax.jit(jax.value_and_grad(model_lib.lm_loss, has_aux=True),
                    static_argnames='config')
  (loss, aux), grads = grad_fn(params, inputs, targets, hidden, **kwargs)
  (loss_p, aux_p), grads_p = grad_fn(params, padded_in, padded_tg, hidden, length=length,
                                     **kwargs)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  np.testing.assert_allclose(aux_p['hidden'], aux['hidden'], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads_p, grads, rtol=1e-4, atol=1e-7)


def test_train_steps_reduce_loss_and_evaluate():
  cfg = model_lib.builtin_config('NAONet-PTB', vocab_size=V, emb_size=E, hidden_size=H,
                                 dropout=0.1, dropouth=0.1, dropoutx=0.1, dropouti=0.1)
  tc = train_lib.TrainConfig(lr=5.0)
  data, params = _toy_setup(cfg)
  before = train_lib.evaluate(params, data, data.shape[1], 5, model_config=cfg)
  state = train_lib.init_train_state(params, tc)
  hidden = model_lib.init_hidden(data.shape[1], cfg)
  key = jax.random.PRNGKey(0)
  losses = []
  sampler = dict(std=1.0, min_len=2, max_delta=2)  # variable lengths 2..7 around bptt 5
  windows = list(text.iterate_bptt(data.shape[0], np.random.default_rng(0), 5, **sampler))
  for i in range(40):
    start, seq_len, lr_scale = windows[i % len(windows)]
    if i and start == 0:
      hidden = model_lib.init_hidden(data.shape[1], cfg)  # a new epoch
    inputs, targets, length = train_lib.pad_window(*text.get_batch(data, start, seq_len))
    state, hidden, metrics = train_lib.train_step(
        state, inputs, targets, hidden, jax.random.fold_in(key, i), np.float32(lr_scale), length,
        model_config=cfg, train_config=tc)
    losses.append(float(metrics['nll']))
  assert int(state.step) == 40 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
  after = train_lib.evaluate(state.params, data, data.shape[1], 5, model_config=cfg)
  assert after['nll'] < before['nll'] - 0.2
  np.testing.assert_allclose(after['ppl'], np.exp(after['nll']), rtol=1e-6)
  # Windows only split the time loop: one long window gives the same mean NLL.
  whole = train_lib.evaluate(state.params, data, data.shape[1], data.shape[0],
                             model_config=cfg)
  np.testing.assert_allclose(whole['nll'], after['nll'], rtol=1e-5)


_COMPILES = []


def _count_compiles(event: str, duration: float, **_) -> None:
  del duration
  if event == '/jax/core/compile/backend_compile_duration':
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def test_ws_train_step_compiles_once_for_many_architectures():
  cfg = model_lib.ws_search_config(vocab_size=V, emb_size=E, hidden_size=H)
  tc = train_lib.TrainConfig(lr=0.25, clip=10.0)
  data, params = _toy_setup(cfg)
  state = train_lib.init_train_state(params, tc)
  hidden = model_lib.init_hidden(data.shape[1], cfg)
  archs = RNN_WS_SPACE.sample(np.random.default_rng(1), 21)
  keys = jax.random.split(jax.random.PRNGKey(0), len(archs))
  inputs, targets, length = train_lib.pad_window(data[:5], data[1:6])
  compiles = before = len(_COMPILES)
  for i, arch in enumerate(archs):
    state, hidden, metrics = train_lib.train_step(
        state, inputs, targets, hidden, keys[i], np.float32(1.0), length, arch,
        model_config=cfg, train_config=tc)
    if i == 0:
      jax.block_until_ready(metrics)
      compiles = len(_COMPILES)
  assert compiles > before  # the counter sees the first compilation
  assert len(_COMPILES) == compiles  # 20 new architectures, 0 compilations
  assert np.isfinite(float(metrics['loss']))


def test_nt_asgd_switch_and_average():
  assert not train_lib.nt_asgd_should_switch([5, 4, 3, 2, 1], 6.0)  # too few epochs
  assert train_lib.nt_asgd_should_switch([5, 4, 3, 2, 1, 1], 5.5)  # worse than min([5])
  assert not train_lib.nt_asgd_should_switch([5, 4, 3, 2, 1, 1], 4.5)
  params = {'w': jnp.zeros(2)}
  state = train_lib.start_averaging(train_lib.init_train_state(params, train_lib.TrainConfig()))
  avg, count = state.avg_params, state.avg_count
  for value in (4.0, 2.0, 0.0):
    avg, count = train_lib.average_update(avg, {'w': jnp.full(2, value)}, count)
  np.testing.assert_allclose(avg['w'], [2.0, 2.0])  # mean of the iterates, not of the start
  assert int(count) == 3
