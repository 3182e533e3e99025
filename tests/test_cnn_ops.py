"""CNN op library: shapes of every op of both spaces, PT semantics of pools/BN/FR, hand-written
VJPs, init, drop-path."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nao_jax import spaces
from nao_jax.cnn import ops

C = 4
ALL_OPS = ([('ws', i, name) for i, name in enumerate(spaces.WS_SPACE.ops)]
           + [('nao', i, name) for i, name in enumerate(spaces.NAO_SPACE.ops)])
TABLES = {'ws': ops.op_table(spaces.WS_SPACE.ops), 'nao': ops.op_table(spaces.NAO_SPACE.ops)}


def _x(shape=(2, 8, 8, C), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _conv_ref(x, w, stride, padding, groups=1):
  return lax.conv_general_dilated(x, w, (stride, stride) if isinstance(stride, int) else stride,
                                  padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('space,op_id,name', ALL_OPS)
def test_every_op_output_shape_and_stats(space, op_id, name, stride):
  op = TABLES[space][op_id]
  assert op.name == name
  params, stats = op.init(jax.random.key(1), C, C, stride)
  x = _x()
  for train in (True, False):
    y, new_stats = op.apply(params, stats, x, stride=stride, train=train)
    assert y.shape == (2, 8 // stride, 8 // stride, C), (name, stride)
    assert y.dtype == jnp.float32
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    assert bool(jnp.all(jnp.isfinite(y)))
  # Stride-1 identity and the pools are parameter-free; everything else has BN statistics.
  parameter_free = 'pool' in name or (name == 'identity' and stride == 1)
  assert (not jax.tree.leaves(params)) == parameter_free


def test_op_parameter_counts_follow_pt_modules():
  def count(op, stride=1):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(op.init(jax.random.key(0), C, C,
                                                                   stride)[0]))
  ws, nao = TABLES['ws'], TABLES['nao']
  # SepConv: dw k*k*C, pw C*C, BN 2C; twice.
  assert count(ws[0]) == 2 * (9 * C + C * C + 2 * C)
  assert count(ws[1]) == 2 * (25 * C + C * C + 2 * C)
  assert count(nao[1]) == C * C + 2 * C
  assert count(nao[2]) == 9 * C * C + 2 * C
  assert count(nao[3]) == 2 * (3 * C * C + 2 * C)
  assert count(nao[4]) == 2 * (7 * C * C + 2 * C)
  # Identity at stride 2 = FactorizedReduce: two 1x1 convs to C/2 and a BN.
  assert count(ws[4], stride=2) == 2 * C * (C // 2) + 2 * C


def test_op_table_resolves_avg_pool_3x3_per_space():
  ones = jnp.ones((1, 4, 4, 1))
  ws_avg = TABLES['ws'][spaces.WS_SPACE.ops.index('avg_pool_3x3')]
  nao_avg = TABLES['nao'][spaces.NAO_SPACE.ops.index('avg_pool_3x3')]
  # Corner of a 3x3 window: 4 real pixels out of 9.
  assert float(ws_avg.apply({}, {}, ones, stride=1, train=True)[0][0, 0, 0, 0]) == 1.0
  assert float(nao_avg.apply({}, {}, ones, stride=1, train=True)[0][0, 0, 0, 0]) == \
      pytest.approx(4 / 9)
  tf_table = ops.op_table(spaces.NAO_SPACE.ops, avg_pool_exclude_pad=True)
  assert float(tf_table[9].apply({}, {}, ones, stride=1, train=True)[0][0, 0, 0, 0]) == 1.0
  with pytest.raises(ValueError, match='no op library'):
    ops.op_table(('identity', 'conv_9x9'))


def test_avg_pool_5x5_counts_padding_in_nao_space():
  ones = jnp.ones((1, 8, 8, 1))
  y, _ = TABLES['nao'][10].apply({}, {}, ones, stride=2, train=True)
  assert y.shape == (1, 4, 4, 1)
  assert float(y[0, 0, 0, 0]) == pytest.approx(9 / 25)  # 3x3 real pixels in the corner window
  assert float(y[0, 1, 1, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize('k,stride,include', [(3, 1, False), (3, 2, False), (5, 2, True),
                                               (5, 1, False), (5, 3, True)])
def test_avg_pool_matches_2d_window_reference(k, stride, include):
  x = _x((2, 9, 8, 3))
  pad = k // 2 if k != 5 or stride != 3 else 0
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, stride, stride, 1), padding)
  count = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, (1, k, k, 1), (1, stride, stride, 1),
                            padding)
  ref = total / (k * k if include else count)
  np.testing.assert_allclose(ops.avg_pool(x, k, stride, pad, include), ref, rtol=1e-5, atol=1e-6)


def test_2x2_pools_zero_pad_bottom_right():
  x = -jnp.ones((1, 4, 4, 1))
  max2 = TABLES['nao'][spaces.NAO_SPACE.ops.index('max_pool_2x2')]
  avg2 = TABLES['nao'][spaces.NAO_SPACE.ops.index('avg_pool_2x2')]
  y, _ = max2.apply({}, {}, x, stride=1, train=True)
  np.testing.assert_array_equal(y[0, :3, :3, 0], -1.0)
  np.testing.assert_array_equal(y[0, 3, :, 0], 0.0)  # padded zeros win the max on the border
  np.testing.assert_array_equal(y[0, :, 3, 0], 0.0)
  y, _ = avg2.apply({}, {}, x, stride=1, train=True)
  assert float(y[0, 3, 3, 0]) == pytest.approx(-0.25)  # 1 real pixel / 4
  assert float(y[0, 0, 3, 0]) == pytest.approx(-0.5)
  y, _ = max2.apply({}, {}, _x((1, 5, 5, 1)), stride=2, train=True)
  assert y.shape == (1, 3, 3, 1)


def test_max_pool_never_picks_padding():
  x = -jnp.ones((1, 4, 4, 1))
  assert float(ops.max_pool(x, 3, 1, 1).max()) == -1.0


@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (2, 2), (5, 2)])
def test_max_pool_gradient_goes_to_first_maximum(k, stride):
  pad = k // 2 if k % 2 else 0
  x = jnp.round(_x((2, 7, 7, 2)) * 2) / 2  # many ties
  grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, k, stride, pad) * jnp.arange(1.0, 3.0)))(x)
  # Reference: route each window's gradient to its first (row-major) maximum.
  xp = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  ref = np.zeros_like(xp)
  y = np.asarray(ops.max_pool(x, k, stride, pad))
  for b, i, j, c in np.ndindex(*y.shape):
    window = xp[b, i * stride:i * stride + k, j * stride:j * stride + k, c]
    di, dj = np.unravel_index(np.argmax(window), window.shape)
    ref[b, i * stride + di, j * stride + dj, c] += c + 1
  np.testing.assert_array_equal(grad, ref[:, pad:pad + 7, pad:pad + 7])


def test_conv_and_depthwise_gradients_match_autodiff_of_lax_conv():
  # conv2d has hand-written VJPs (canonical-layout backward convs); check them against JAX.
  cases = [((3, 3), 1, 1, (1, 1)), ((1, 7), (1, 2), 1, (0, 3)), ((5, 5), 2, 1, (2, 2)),
           ((3, 3), 2, C, (1, 1)), ((5, 5), 1, C, (2, 2))]
  x = _x((2, 7, 7, C))
  for (kh, kw), stride, groups, (ph, pw) in cases:
    w = ops.conv_init(jax.random.key(kh * kw), kh, kw, C, C, groups=groups)
    padding = ((ph, ph), (pw, pw))
    mine = jax.grad(lambda x, w: jnp.sum(jnp.sin(ops.conv2d(x, w, stride, padding, groups))),
                    (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(_conv_ref(x, w, stride, padding, groups))),
                   (0, 1))(x, w)
    for a, b in zip(mine, ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_batch_norm_train_and_eval():
  params, stats = ops.batch_norm_init(3)
  params = {'scale': jnp.array([1.0, 2.0, 0.5]), 'bias': jnp.array([0.0, 1.0, -1.0])}
  x = _x((4, 3, 3, 3)) * 3 + 1
  y, new = ops.batch_norm(params, stats, x, train=True)
  flat = np.asarray(x).reshape(-1, 3)
  mean, var = flat.mean(0), flat.var(0)
  expected = (flat - mean) / np.sqrt(var + 1e-5) * np.asarray(params['scale']) + np.asarray(
      params['bias'])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), expected, rtol=1e-4, atol=1e-4)
  # PT: running = 0.9 running + 0.1 batch, with the unbiased batch variance.
  np.testing.assert_allclose(new['mean'], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  y_eval, same = ops.batch_norm(params, new, x, train=False)
  assert same is new
  expected = ((flat - np.asarray(new['mean'])) / np.sqrt(np.asarray(new['var']) + 1e-5)
              * np.asarray(params['scale']) + np.asarray(params['bias']))
  np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 3), expected, rtol=1e-4, atol=1e-5)


def test_factorized_reduce_samples_complementary_pixels():
  params, stats = ops.factorized_reduce_init(jax.random.key(0), C, 6)
  x = _x()
  y, _ = ops.factorized_reduce_apply(params, stats, x, train=False)
  path1 = _conv_ref(x[:, ::2, ::2], params['conv1'], 1, ((0, 0), (0, 0)))
  path2 = _conv_ref(x[:, 1::2, 1::2], params['conv2'], 1, ((0, 0), (0, 0)))
  ref = jnp.concatenate([path1, path2], -1) / jnp.sqrt(1 + 1e-5)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='even'):
    ops.factorized_reduce_init(jax.random.key(0), C, 5)


def test_sep_conv_matches_explicit_composition():
  params, stats = ops.sep_conv_init(jax.random.key(0), C, 6, kernel=5)
  x = _x()
  y, _ = ops.sep_conv_apply(params, stats, x, stride=2, train=False, kernel=5)
  bn = lambda v: v / jnp.sqrt(1 + 1e-5)  # fresh statistics: mean 0, var 1, scale 1, bias 0
  h = _conv_ref(jax.nn.relu(x), params['dw1'], 2, ((2, 2), (2, 2)), groups=C)
  h = bn(_conv_ref(h, params['pw1'], 1, ((0, 0), (0, 0))))
  h = _conv_ref(jax.nn.relu(h), params['dw2'], 1, ((2, 2), (2, 2)), groups=C)
  h = bn(_conv_ref(h, params['pw2'], 1, ((0, 0), (0, 0))))
  assert params['dw1'].shape == (5, 5, 1, C) and params['pw2'].shape == (1, 1, C, 6)
  np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-5)


def test_conv_1x7_7x1_strides_each_axis_once():
  op = TABLES['nao'][spaces.NAO_SPACE.ops.index('conv_1x7_7x1')]
  params, stats = op.init(jax.random.key(0), C, C, 2)
  assert params['a']['conv'].shape == (1, 7, C, C) and params['b']['conv'].shape == (7, 1, C, C)
  x = _x()
  y, _ = op.apply(params, stats, x, stride=2, train=False)
  h = _conv_ref(jax.nn.relu(x), params['a']['conv'], (1, 2), ((0, 0), (3, 3))) / jnp.sqrt(1 + 1e-5)
  h = _conv_ref(jax.nn.relu(h), params['b']['conv'], (2, 1), ((3, 3), (0, 0))) / jnp.sqrt(1 + 1e-5)
  np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='C -> C'):
    op.init(jax.random.key(0), C, 2 * C, 1)


def test_merged_relu_conv_bn_equals_separate_ops():
  op = TABLES['nao'][spaces.NAO_SPACE.ops.index('conv_3x3')]
  inits = [op.init(jax.random.key(i), C, C, 2) for i in range(3)]
  x = _x()
  ys, stats = ops.relu_conv_bn_apply_many([p for p, _ in inits], [s for _, s in inits], x,
                                          stride=2, train=True)
  for (p, s), y, new in zip(inits, ys, stats):
    ref_y, ref_s = op.apply(p, s, x, stride=2, train=True)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), new, ref_s)


def test_conv2d_1x1_fast_path_equals_convolution():
  w = ops.conv_init(jax.random.key(3), 1, 1, C, 6)
  x = _x((2, 7, 7, C))
  for stride in (1, 2):
    np.testing.assert_allclose(ops.conv2d(x, w, stride), _conv_ref(x, w, stride, ((0, 0), (0, 0))),
                               rtol=1e-5, atol=1e-5)


def test_stride_2_matches_pytorch_output_size_and_alignment():
  # PT pads k//2 symmetrically: output pixel (i, j) is centred on input (2i, 2j).
  w = ops.conv_init(jax.random.key(0), 3, 3, 1, 1)
  x = _x((1, 8, 8, 1))
  y = ops.conv2d(x, w, 2, ((1, 1), (1, 1)))
  assert y.shape == (1, 4, 4, 1)
  centre = jnp.sum(x[0, 1:4, 1:4, 0] * w[:, :, 0, 0])  # output (1, 1) <- input rows/cols 1..3
  assert float(y[0, 1, 1, 0]) == pytest.approx(float(centre), rel=1e-5)


def test_init_follows_pytorch_defaults():
  w = ops.conv_init(jax.random.key(0), 3, 3, 64, 64)
  assert float(jnp.std(w)) == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
  dw = ops.conv_init(jax.random.key(1), 5, 5, 256, 256, groups=256)
  assert dw.shape == (5, 5, 1, 256)
  assert float(jnp.std(dw)) == pytest.approx(math.sqrt(2 / 25), rel=0.1)
  lin = ops.linear_init(jax.random.key(2), 400, 1000)
  assert float(jnp.std(lin['kernel'])) == pytest.approx(math.sqrt(2 / 400), rel=0.05)
  assert float(jnp.max(jnp.abs(lin['bias']))) <= 1 / math.sqrt(400)
  params, stats = ops.batch_norm_init(3)
  np.testing.assert_array_equal(params['scale'], 1.0)
  np.testing.assert_array_equal(stats['var'], 1.0)


def test_drop_path_masks_whole_samples_and_rescales():
  x = jnp.ones((2000, 2, 2, 3))
  y = ops.drop_path(x, 0.7, jax.random.key(0))
  per_sample = np.asarray(y).reshape(2000, -1)
  assert np.all(per_sample.min(1) == per_sample.max(1))  # one decision per sample
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.7], rtol=1e-6)
  assert float(jnp.mean(y)) == pytest.approx(1.0, abs=0.05)
  assert (per_sample[:, 0] > 0).mean() == pytest.approx(0.7, abs=0.04)
  np.testing.assert_array_equal(ops.drop_path(x, 1.0, jax.random.key(0)), x)


def test_calibration_rules():
  key = jax.random.key(0)
  # Same size, channels differ on both: two ReLU-1x1-BN.
  p, s = ops.calibrate_init(key, 12, 9, C, reduce_x0=False)
  assert set(p) == {'x0', 'x1'} and p['x0']['conv'].shape == (1, 1, 12, C)
  s0, s1, _ = ops.calibrate_apply(p, s, _x((2, 8, 8, 12)), _x((2, 8, 8, 9)), train=True)
  assert s0.shape == s1.shape == (2, 8, 8, C)
  # After a reduction: input 0 is factorized-reduced, input 1 (already C) untouched.
  p, s = ops.calibrate_init(key, 12, C, C, reduce_x0=True)
  assert set(p) == {'x0'} and set(p['x0']) == {'conv1', 'conv2', 'bn'}
  x1 = _x((2, 4, 4, C), 1)
  s0, s1, _ = ops.calibrate_apply(p, s, _x((2, 8, 8, 12)), x1, train=True)
  assert s0.shape == (2, 4, 4, C) and s1 is x1
  # Nothing to do.
  assert ops.calibrate_init(key, C, C, C, reduce_x0=False) == ({}, {})
