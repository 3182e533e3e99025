"""Fixed-architecture network: exact PT parameter counts, hand-built reference cells, scanned
stages (trace size independent of N), drop-path schedule and the training step."""

import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nao_jax import spaces
from nao_jax.cnn import network as nw
from nao_jax.cnn import ops
from nao_jax.cnn import train as train_lib

WS, NAO = spaces.WS_SPACE, spaces.NAO_SPACE
BN = 1 / np.sqrt(1 + 1e-5)  # a fresh BatchNorm in eval mode only rescales by this

# -- parameter counts (measured on the PyTorch reference, project defaults) ---------------------


@pytest.mark.parametrize('name,layers,channels,without_aux,with_aux', [
    ('NAONet-A', 6, 36, 11_470_150, 11_946_576),
    ('NAONet-A-PT', 6, 36, 11_470_150, 11_946_576),
    ('NAONet-A', 6, 128, 144_576_394, 145_241_236),
    ('NAONet-B', 6, 36, 2_921_302, 3_379_296),
    ('NAONet-WS', 5, 36, 2_301_310, 2_777_736),
])
def test_parameter_counts_equal_pytorch_reference(name, layers, channels, without_aux, with_aux):
  space, arch = spaces.get_builtin(name)
  counts = nw.parameter_counts(nw.FixedNetwork(
      space, arch, nw.NetworkConfig(layers=layers, channels=channels, num_classes=10)))
  assert counts['without_aux'] == without_aux
  assert counts['total'] == with_aux
  no_aux = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=layers, channels=channels,
                                                         use_aux_head=False))
  assert nw.parameter_counts(no_aux)['total'] == without_aux


# -- structure ------------------------------------------------------------------------------------


def test_plan_channels_reductions_and_segments():
  space, arch = spaces.get_builtin('NAONet-A')
  net = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=6, channels=36))
  assert [c.index for c in net.cells if c.reduction] == [6, 13]
  assert [c.channels for c in net.cells] == [36] * 6 + [72] * 7 + [144] * 7
  assert net.cells[0].concat == (3, 5, 6) and net.cells[6].concat == (3, 4, 5, 6)
  assert net.output_channels == 3 * 144
  # Stage 1 starts steady (stem 3F = 3 loose ends x F); later stages scan from their 3rd cell.
  assert net.segments == ((0, 6), (6, 7), (7, 8), (8, 9), (9, 13), (13, 14), (14, 15), (15, 16),
                          (16, 20))
  assert net.aux_head_index == 13
  assert [b.stride for b in net.cells[6].branches] == [2, 2, 2, 2, 2, 2, 2, 1, 2, 2]
  # conv3x3(h0) of nodes 2 and 6 run as one conv, as do conv3x3(h1) of nodes 3 and 4.
  assert net.merge_groups(net.cells[0]) == {0: (0, 9), 9: (0, 9), 3: (3, 5), 5: (3, 5)}


def _count_eqns(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += _count_eqns(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += _count_eqns(sub)
  return total


@pytest.mark.parametrize('name,grad', [('NAONet-A', False), ('NAONet-B', True)])
def test_traced_program_does_not_grow_with_layers(name, grad):
  # NAONet-A's stage 1 is scanned from cell 0 (stem 3F = 3 loose ends x F), NAONet-B's from
  # cell 2; 3N + 2 = 11 vs 20 cells would nearly double an unrolled program.
  space, arch = spaces.get_builtin(name)
  sizes = {}
  for layers in (3, 6):
    net = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=layers, channels=4,
                                                        use_aux_head=False))
    params, stats = jax.eval_shape(net.init, jax.random.key(0))
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)

    def loss(params, stats, images, net=net):
      logits, _, _ = net.apply(params, stats, images, train=True, rng=jax.random.key(0),
                               drop_path_progress=0.5)
      return jnp.sum(logits)

    fn = jax.grad(loss) if grad else loss
    sizes[layers] = _count_eqns(jax.make_jaxpr(fn)(params, stats, images).jaxpr)
  assert sizes[3] == sizes[6]


# -- hand-computed reference cells ----------------------------------------------------------------


def _toy(space, arch, layers=1, **kw):
  net = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=layers, channels=4,
                                                      use_aux_head=False, **kw))
  return net, *jax.jit(net.init)(jax.random.key(0))


def _rcb(p, x, kh, kw, stride=(1, 1)):
  """ReLU-conv-BN with fresh statistics (eval mode), 'same'-style PT padding."""
  pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
  return ops.conv2d(jax.nn.relu(x), p['conv'], stride, pad) * BN


def test_naonet_a_normal_cell_equals_hand_written_cell():
  space, arch = spaces.get_builtin('NAONet-A')
  net, params, stats = _toy(space, arch)
  p, s = net.cell_variables(params, stats, 0)
  h0 = jax.random.normal(jax.random.key(1), (2, 8, 8, 12))
  h1 = jax.random.normal(jax.random.key(2), (2, 8, 8, 12))
  out, _ = jax.jit(functools.partial(net.cell_apply, net.cells[0], train=False))(p, s, h0, h1)
  np.testing.assert_allclose(out, _hand_naonet_normal(p, h0, h1), rtol=1e-4, atol=1e-4)


@jax.jit
def _hand_naonet_normal(p, h0, h1):
  # Calibration: both inputs have 3F = 12 channels != F = 4.
  x0, x1 = _rcb(p['calibrate']['x0'], h0, 1, 1), _rcb(p['calibrate']['x1'], h1, 1, 1)
  b = p['branches']

  def conv13(q, x):
    return _rcb(q['b'], _rcb(q['a'], x, 1, 3), 3, 1)

  # NAONet normal cell (spec §8.1): 0 conv3x3, 1 avg5x5 | 2 conv1x3+3x1, 1 conv3x3 |
  # 0 conv1x1, 1 conv3x3 | 0 conv1x3+3x1, 4 conv3x3 | 1 identity, 0 conv3x3; loose 3, 5, 6.
  avg5 = ops.avg_pool(x1, 5, 1, 2, count_include_pad=True)
  n2 = _rcb(b['node2_x'], x0, 3, 3) + avg5
  n3 = conv13(b['node3_x'], n2) + _rcb(b['node3_y'], x1, 3, 3)
  n4 = _rcb(b['node4_x'], x0, 1, 1) + _rcb(b['node4_y'], x1, 3, 3)
  n5 = conv13(b['node5_x'], x0) + _rcb(b['node5_y'], n4, 3, 3)
  n6 = x1 + _rcb(b['node6_y'], x0, 3, 3)
  return jnp.concatenate([n3, n5, n6], -1)


def test_reduction_cell_with_unused_input_equals_hand_written_cell():
  # WS reduction cell that leaves h_{i-1} unused: it must be factorized-reduced into the concat.
  reduction = [[0, 0, 0, 4], [2, 2, 0, 3], [3, 1, 2, 4], [0, 2, 4, 3], [5, 4, 2, 0]]
  _, ws_b = spaces.get_builtin('NAONet-B')
  arch = np.stack([ws_b[0], np.array(reduction)])
  net, params, stats = _toy(WS, arch)
  plan = net.cells[1]
  assert plan.reduction and plan.concat == (1, 6)
  p, s = net.cell_variables(params, stats, 1)
  h0 = jax.random.normal(jax.random.key(1), (2, 8, 8, 12))  # the stem (3F)
  h1 = jax.random.normal(jax.random.key(2), (2, 8, 8, 12))  # cell 0: 3 loose ends x F
  out, _ = jax.jit(functools.partial(net.cell_apply, plan, train=False))(p, s, h0, h1)
  assert out.shape == (2, 4, 4, 16)  # 2 loose ends x 2F
  np.testing.assert_allclose(out, _hand_reduction(p, h0, h1), rtol=1e-4, atol=1e-4)


@jax.jit
def _hand_reduction(p, h0, h1):
  x0, x1 = _rcb(p['calibrate']['x0'], h0, 1, 1), _rcb(p['calibrate']['x1'], h1, 1, 1)
  b = p['branches']

  def sep(q, x, k, stride):
    pad = ((k // 2, k // 2),) * 2
    c = x.shape[-1]
    y = ops.conv2d(jax.nn.relu(x), q['dw1'], stride, pad, groups=c)
    y = ops.conv2d(y, q['pw1']) * BN
    y = ops.conv2d(jax.nn.relu(y), q['dw2'], 1, pad, groups=c)
    return ops.conv2d(y, q['pw2']) * BN

  def fr(q, x):
    fresh = ops.batch_norm_init(q['bn']['scale'].shape[0])[1]
    return ops.factorized_reduce_apply(q, {'bn': fresh}, x, train=False)[0]

  avg3 = functools.partial(ops.avg_pool, k=3, pad=1, count_include_pad=False)
  max3 = functools.partial(ops.max_pool, k=3, pad=1)
  n2 = sep(b['node2_x'], x0, 3, 2) + fr(b['node2_y'], x0)
  n3 = avg3(n2, stride=1) + max3(x0, stride=2)
  n4 = sep(b['node4_x'], n3, 5, 1) + n2
  n5 = avg3(x0, stride=2) + max3(n4, stride=1)
  n6 = n5 + sep(b['node6_y'], n2, 3, 1)
  return jnp.concatenate([fr(p['combine']['fr1'], x1), n6], -1)


def test_scanned_network_equals_cell_by_cell_chain_with_drop_path():
  # Same rng -> same drop-path masks only if each scanned cell sees its own index.
  space, arch = spaces.get_builtin('NAONet-A')
  net, params, stats = _toy(space, arch, layers=2, drop_path_keep=0.5, dropout_keep=1.0)
  assert net.segments[0] == (0, 2) and net.is_scanned(0, 2)
  images = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  rng, progress = jax.random.key(4), 0.8
  apply = jax.jit(functools.partial(net.apply, train=True, drop_path_progress=progress))
  logits, aux, _ = apply(params, stats, images, rng=rng)
  assert aux is None

  @jax.jit
  def chain(params, stats, images):
    dp_rng, _ = jax.random.split(rng)
    x = ops.conv2d(images, params['stem']['conv'], 1, ((1, 1), (1, 1)))
    s0 = s1 = ops.batch_norm(params['stem']['bn'], stats['stem']['bn'], x, train=True)[0]
    for i in range(net.num_cells):
      p, s = net.cell_variables(params, stats, i)
      keep = nw.drop_path_keep_prob(0.5, progress, i, net.num_cells)
      out, _ = net.cell_apply(net.cells[i], p, s, s0, s1, train=True,
                              rng=jax.random.fold_in(dp_rng, i), keep=keep)
      s0, s1 = s1, out
    return ops.linear_apply(params['classifier'], jnp.mean(s1, axis=(1, 2)))

  np.testing.assert_allclose(logits, chain(params, stats, images), rtol=1e-4, atol=1e-4)
  # The masks do depend on the cell index: a chain that reuses cell 0's key differs.
  other, _, _ = apply(params, stats, images, rng=jax.random.key(5))
  assert not np.allclose(logits, other)


# -- drop-path schedule ---------------------------------------------------------------------------


def test_drop_path_schedule_values():
  keep = functools.partial(nw.drop_path_keep_prob, 0.8, num_cells=20)
  assert keep(0.0, cell_index=19) == 1.0
  assert keep(1.0, cell_index=19) == pytest.approx(0.8)
  assert keep(1.0, cell_index=0) == pytest.approx(1 - 0.2 / 20)
  assert keep(0.5, cell_index=9) == pytest.approx(1 - 0.5 * 0.5 * 0.2)
  assert float(nw.drop_path_progress(0, 1000)) == 0.0
  assert float(nw.drop_path_progress(250, 1000)) == 0.25
  assert float(nw.drop_path_progress(5000, 1000)) == 1.0


@pytest.mark.parametrize('drop_identity', [True, False])
def test_drop_path_on_identity_is_an_option(drop_identity):
  identity = WS.ops.index('identity')
  cell = np.array([[0, identity, 1, identity], [2, identity, 0, identity],
                   [3, identity, 1, identity], [4, identity, 2, identity],
                   [5, identity, 3, identity]])
  arch = np.stack([cell, spaces.get_builtin('NAONet-B')[1][1]])
  net, params, stats = _toy(WS, arch, drop_path_identity=drop_identity)
  h = jax.random.normal(jax.random.key(1), (16, 8, 8, 12))
  p, s = net.cell_variables(params, stats, 0)
  plain, _ = net.cell_apply(net.cells[0], p, s, h, h, train=True)
  dropped, _ = net.cell_apply(net.cells[0], p, s, h, h, train=True, rng=jax.random.key(5),
                              keep=0.3)
  assert bool(jnp.allclose(plain, dropped)) != drop_identity


# -- forward / training ---------------------------------------------------------------------------


def test_forward_shapes_with_aux_head():
  space, arch = spaces.get_builtin('NAONet-A-PT')
  net = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=1, channels=4, num_classes=7))
  params, stats = jax.jit(net.init)(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits, aux, new_stats = jax.jit(functools.partial(net.apply, train=True))(
      params, stats, images, rng=jax.random.key(2), drop_path_progress=1.0)
  assert logits.shape == aux.shape == (2, 7)
  assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
  logits, aux, same = jax.jit(functools.partial(net.apply, train=False))(params, stats, images)
  assert logits.shape == (2, 7) and aux is None
  jax.tree.map(np.testing.assert_array_equal, same, stats)


def test_shift_depthwise_primitives_equal_the_library_in_value_and_gradient():
  space, arch = spaces.get_builtin('NAONet-WS')   # sep convs in both cells
  nets = {p: nw.FixedNetwork(space, arch, nw.NetworkConfig(
      layers=1, channels=4, use_aux_head=False, drop_path_keep=1.0, dropout_keep=1.0,
      primitives=p)) for p in ('library', 'shifts')}
  params, stats = jax.jit(nets['library'].init)(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

  def loss(p, net):
    # Inference-mode BN: with batch statistics over 2 images, float rounding near ReLU kinks
    # is amplified into gradients that differ between any two orders of summation.
    logits, _, _ = net.apply(p, stats, images, train=False)
    return jnp.sum(logits ** 2)

  values = {k: jax.jit(jax.value_and_grad(functools.partial(loss, net=n)))(params)
            for k, n in nets.items()}
  np.testing.assert_allclose(values['shifts'][0], values['library'][0], rtol=1e-5)
  def close(a, b):  # float32 rounding, relative to the leaf's largest gradient
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))

  jax.tree.map(close, values['shifts'][1], values['library'][1])
  with pytest.raises(ValueError, match='primitives'):
    nw.FixedNetwork(space, arch, nw.NetworkConfig(primitives='fast'))


def test_optimizer_is_pt_sgd_with_coupled_decay_after_clipping():
  opt = train_lib.make_optimizer(0.1, weight_decay=0.01, clip_norm=1.0)
  w = {'w': jnp.array([1.0, -2.0])}
  g = {'w': jnp.array([3.0, 4.0])}  # norm 5 -> clipped to norm 1
  state = opt.init(w)
  updates, state = opt.update(g, state, w)
  d1 = np.array([0.6, 0.8]) + 0.01 * np.array([1.0, -2.0])
  np.testing.assert_allclose(updates['w'], -0.1 * d1, rtol=1e-6)
  w2 = optax.apply_updates(w, updates)
  updates, _ = opt.update(g, state, w2)
  d2 = np.array([0.6, 0.8]) + 0.01 * np.asarray(w2['w'])
  np.testing.assert_allclose(updates['w'], -0.1 * (0.9 * d1 + d2), rtol=1e-5)


def test_train_step_updates_params_and_batch_stats():
  space, arch = spaces.get_builtin('NAONet-A')
  net = nw.FixedNetwork(space, arch, nw.NetworkConfig(layers=1, channels=4))
  opt = train_lib.make_optimizer(0.05)
  state = train_lib.create_train_state(net, opt, jax.random.key(0))
  before = jax.tree.map(np.asarray, state)
  step_fn = train_lib.make_train_step(net, opt, total_steps=10)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 3])
  state, metrics = step_fn(state, images, labels, jax.random.key(2), 5)
  assert int(state.step) == 1
  assert set(metrics) == {'loss', 'ce', 'aux_ce', 'accuracy', 'grad_norm'}
  assert np.isfinite(float(metrics['loss'])) and float(metrics['aux_ce']) > 0
  assert float(metrics['loss']) == pytest.approx(
      float(metrics['ce']) + 0.4 * float(metrics['aux_ce']), rel=1e-5)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before.params, state.params)
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(before.batch_stats['stem']['bn']['mean'],
                         state.batch_stats['stem']['bn']['mean'])
