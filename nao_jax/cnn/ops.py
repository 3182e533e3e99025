"""CNN op library shared by the fixed-architecture network and the weight-sharing supernet.

Every op is a pair of pure functions over explicit pytrees (spec §6.2, PT-V1 ``operations.py``):

* ``init(key, c_in, c_out, stride) -> (params, stats)``: trainable parameters and BatchNorm
  running statistics, as two nested dicts of the same layout (a BatchNorm at ``params['bn']`` =
  ``{'scale', 'bias'}`` has its statistics at ``stats['bn']`` = ``{'mean', 'var'}``).
* ``apply(params, stats, x, *, stride, train) -> (y, stats)``: ``x`` is ``float32[B, H, W, C]``
  (NHWC); ``train=True`` normalises with batch statistics and returns updated running
  statistics, ``train=False`` uses (and returns unchanged) the running ones.

Keeping the statistics apart from the parameters is what lets the supernet reuse this math: it
gathers per-(node, branch, input index, op) parameters with a dynamic index and passes a shared
set of running statistics (PT's WSBN: per-input affine, shared mean/var, spec §5.2).

Ops are looked up by id through ``op_table(space.ops)``: the same name can mean different math in
the two spaces (``avg_pool_3x3`` counts padded zeros in the 11-op space but not in the 5-op one).

Layouts: conv kernels ``float32[KH, KW, C_in / groups, C_out]`` (HWIO), linear kernels
``float32[C_in, C_out]``. Initialisation follows PyTorch as NAO_V1 sets it: kaiming-normal
(fan_in, gain sqrt(2)) for every tensor with >= 2 dims, BN scale 1 / bias 0, linear bias
uniform(+-1/sqrt(fan_in)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = dict[str, Any]
Stats = dict[str, Any]

BN_MOMENTUM = 0.9  # JAX convention: new = m * old + (1 - m) * batch; PT momentum 0.1.
BN_EPS = 1e-5
_DIMS = ('NHWC', 'HWIO', 'NHWC')


# -- initialisers ---------------------------------------------------------------------------------


def _host_draw(key_data: np.ndarray, *, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel().tolist())
  if kind == 'normal':
    return rng.standard_normal(shape, dtype=np.float32)
  return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def host_random(key: jax.Array, shape: Sequence[int], kind: str = 'normal') -> jax.Array:
  """Standard normal (or uniform(-1, 1)) ``float32[shape]`` drawn on the host from ``key``.

  Initialisation draws one tensor per weight. XLA:CPU expands every on-device draw (threefry or
  RngBitGenerator) into hundreds of instructions, which made compiling a network's init take
  tens of seconds; a host callback seeded with the key's data is deterministic, traceable (also
  under ``jax.eval_shape`` and ``jit``) and costs nothing to compile.
  """
  shape = tuple(shape)
  key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return jax.pure_callback(functools.partial(_host_draw, kind=kind, shape=shape),
                           jax.ShapeDtypeStruct(shape, jnp.float32), key_data,
                           vmap_method='sequential')


def kaiming_normal(key: jax.Array, shape: Sequence[int], fan_in: int) -> jax.Array:
  """PyTorch ``kaiming_normal_`` (mode fan_in, ReLU gain): N(0, 2 / fan_in)."""
  return host_random(key, shape) * math.sqrt(2.0 / fan_in)


def conv_init(key: jax.Array, kh: int, kw: int, c_in: int, c_out: int,
              groups: int = 1) -> jax.Array:
  """Returns a kaiming-normal conv kernel ``float32[kh, kw, c_in / groups, c_out]``."""
  return kaiming_normal(key, (kh, kw, c_in // groups, c_out), kh * kw * (c_in // groups))


def linear_init(key: jax.Array, c_in: int, c_out: int) -> Params:
  """PyTorch ``nn.Linear`` as NAO_V1 initialises it: kaiming-normal kernel, default bias."""
  k_w, k_b = jax.random.split(key)
  bound = 1.0 / math.sqrt(c_in)
  return {'kernel': kaiming_normal(k_w, (c_in, c_out), c_in),
          'bias': host_random(k_b, (c_out,), 'uniform') * bound}


def linear_apply(params: Params, x: jax.Array) -> jax.Array:
  """``float32[B, C_in] -> float32[B, C_out]``."""
  return x @ params['kernel'] + params['bias']


# -- primitives -----------------------------------------------------------------------------------


def conv2d(x: jax.Array, kernel: jax.Array, stride: int | tuple[int, int] = 1,
           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
           groups: int = 1) -> jax.Array:
  """Cross-correlation in NHWC/HWIO with PyTorch's explicit symmetric padding.

  Explicit padding (not 'SAME') matters at stride 2: 'SAME' pads bottom/right only and would
  sample different pixels than PyTorch's ``padding=k // 2``.

  Args:
    x: ``float32[B, H, W, C_in]``.
    kernel: ``float32[KH, KW, C_in / groups, C_out]``.
    stride: int or ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.
    groups: 1, or ``C_in`` (= ``C_out``) for a depthwise conv.

  Returns:
    ``float32[B, H', W', C_out]``.
  """
  strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
  padding = tuple(tuple(p) for p in padding)
  if kernel.shape[:2] == (1, 1) and groups == 1 and padding == ((0, 0), (0, 0)):
    # A 1x1 conv is a matmul over channels; XLA:CPU runs dot faster than a 1x1 convolution.
    x = x[:, ::strides[0], ::strides[1], :]
    return jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0])
  if groups == 1:
    return _conv(x, kernel, strides, padding)
  if groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[2] == 1:
    return _depthwise(x, kernel, strides, padding)
  raise ValueError(f'conv2d supports groups=1 or depthwise, got groups={groups}, '
                   f'kernel {kernel.shape}, input {x.shape}')


# XLA:CPU runs a convolution fast only in canonical form (NHWC input, HWIO kernel). JAX's
# autodiff transposes of a conv use other dimension orders; outside loops XLA re-lays them out,
# but inside a while loop (lax.scan over cells) it does not and falls back to a naive loop nest
# some 40x slower. The custom VJPs below write both backward convs in canonical form.


def _zero_pad(x: jax.Array, config) -> jax.Array:
  """``lax.pad`` with zeros; ``config`` is ``(lo, hi, interior)`` per axis (negatives crop)."""
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _conv_raw(x, kernel, strides, padding, groups=1):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS,
                                  feature_group_count=groups)


def _dilate(dy: jax.Array, strides) -> jax.Array:
  """Inserts ``stride - 1`` zeros between output pixels (the transpose of striding)."""
  if tuple(strides) == (1, 1):
    return dy
  return _zero_pad(dy, ((0, 0, 0), (0, 0, strides[0] - 1), (0, 0, strides[1] - 1), (0, 0, 0)))


def _input_grad_padding(x_shape, kernel_shape, padding, dyd_shape):
  """Padding of the dilated output gradient so that a full correlation yields ``x``'s size."""
  config = [(0, 0, 0)]
  for axis in (0, 1):
    k, lo = kernel_shape[axis], padding[axis][0]
    config.append((k - 1 - lo, x_shape[1 + axis] + lo - dyd_shape[1 + axis], 0))
  return tuple(config) + ((0, 0, 0),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _conv_raw(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv_raw(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  dyd = _dilate(dy, strides)
  # dx: correlate the padded, dilated gradient with the flipped kernel, in/out swapped.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx = _conv_raw(_zero_pad(dyd, _input_grad_padding(x.shape, kernel.shape, padding, dyd.shape)),
                 flipped, (1, 1), ((0, 0), (0, 0)))
  # dkernel: channels of x as the batch, the batch as features, dy as a kernel; rows/columns
  # that the strided forward never reached are cropped so the result is exactly kh x kw.
  crop = [(x.shape[1 + a] + sum(padding[a]) - kernel.shape[a]) % strides[a] for a in (0, 1)]
  xt = _zero_pad(jnp.transpose(x, (3, 1, 2, 0)),
                 ((0, 0, 0), (padding[0][0], padding[0][1] - crop[0], 0),
                  (padding[1][0], padding[1][1] - crop[1], 0), (0, 0, 0)))
  dk = _conv_raw(xt, jnp.transpose(dyd, (1, 2, 0, 3)), (1, 1), ((0, 0), (0, 0)))
  assert dk.shape[1:3] == (kh, kw), (dk.shape, kernel.shape)
  return dx, jnp.transpose(dk, (1, 2, 0, 3))


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
  return _conv_raw(x, kernel, strides, padding, x.shape[-1])


def _depthwise_fwd(x, kernel, strides, padding):
  return _depthwise(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  kh, kw, _, c = kernel.shape
  dyd = _dilate(dy, strides)
  dx = _conv_raw(_zero_pad(dyd, _input_grad_padding(x.shape, kernel.shape, padding, dyd.shape)),
                 kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)), c)
  # dkernel[i, j, c] = sum_{b, h, w} x_pad[b, h + i, w + j, c] * dyd[b, h, w, c]: k*k fused
  # multiply-reductions (a grouped conv with a batch-sized window is far slower on CPU).
  xp = _zero_pad(x, ((0, 0, 0), (padding[0][0], padding[0][1], 0),
                     (padding[1][0], padding[1][1], 0), (0, 0, 0)))
  hd, wd = dyd.shape[1:3]
  taps = [jnp.sum(xp[:, i:i + hd, j:j + wd, :] * dyd, axis=(0, 1, 2))
          for i in range(kh) for j in range(kw)]
  return dx, jnp.stack(taps).reshape(kh, kw, 1, c)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def batch_norm_init(c: int) -> tuple[Params, Stats]:
  """Affine BatchNorm: ``({'scale', 'bias'}, {'mean', 'var'})``, each ``float32[c]``."""
  return ({'scale': jnp.ones((c,), jnp.float32), 'bias': jnp.zeros((c,), jnp.float32)},
          {'mean': jnp.zeros((c,), jnp.float32), 'var': jnp.ones((c,), jnp.float32)})


def batch_norm(params: Params, stats: Stats, x: jax.Array, *, train: bool,
               momentum: float = BN_MOMENTUM, eps: float = BN_EPS) -> tuple[jax.Array, Stats]:
  """PyTorch ``BatchNorm2d`` over ``float32[..., C]`` (statistics over all but the last axis).

  In training the output uses the biased batch variance while the running variance is updated
  with the unbiased one, as PyTorch does.
  """
  if not train:
    inv = lax.rsqrt(stats['var'] + eps) * params['scale']
    return (x - stats['mean']) * inv + params['bias'], stats
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  inv = lax.rsqrt(var + eps) * params['scale']
  y = x * inv + (params['bias'] - mean * inv)
  unbiased = var * (n / max(n - 1, 1))
  new_stats = {'mean': momentum * stats['mean'] + (1 - momentum) * lax.stop_gradient(mean),
               'var': momentum * stats['var'] + (1 - momentum) * lax.stop_gradient(unbiased)}
  return y, new_stats


def max_pool(x: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
  """``nn.MaxPool2d(k, stride, pad)``: padded positions never win (-inf).

  The gradient goes to the first maximum of each window in row-major order, as PyTorch's CPU
  kernel does; it is computed with k*k fused compare-and-select passes because XLA:CPU's
  ``select_and_scatter`` (autodiff of ``reduce_window``) is some 20x slower than the forward.
  """
  return _max_pool(x, k, stride, pad)


def _max_pool_raw(x, k, stride, pad):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, stride, stride, 1),
                           ((0, 0), (pad, pad), (pad, pad), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, k, stride, pad):
  return _max_pool_raw(x, k, stride, pad)


def _max_pool_fwd(x, k, stride, pad):
  y = _max_pool_raw(x, k, stride, pad)
  return y, (x, y)


def _max_pool_bwd(k, stride, pad, residuals, dy):
  x, y = residuals
  b, h, w, c = x.shape
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (pad, pad, 0), (pad, pad, 0),
                                                  (0, 0, 0)))
  ho, wo = y.shape[1:3]
  span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, x.dtype)
  for i in range(k):
    for j in range(k):
      window = lax.slice(xp, (0, i, j, 0), (b, i + span_h, j + span_w, c), (1, stride, stride, 1))
      hit = (window == y) & ~taken
      taken = taken | hit
      routed = jnp.where(hit, dy, 0.0)
      dxp = dxp + _zero_pad(routed, ((0, 0, 0), (i, xp.shape[1] - i - span_h, stride - 1),
                                     (j, xp.shape[2] - j - span_w, stride - 1), (0, 0, 0)))
  return (dxp[:, pad:pad + h, pad:pad + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _window_sum(x: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
  """Sum over k x k windows as a column pass then a row pass (2k instead of k*k adds)."""
  x = lax.reduce_window(x, 0.0, lax.add, (1, k, 1, 1), (1, stride, 1, 1),
                        ((0, 0), (pad, pad), (0, 0), (0, 0)))
  return lax.reduce_window(x, 0.0, lax.add, (1, 1, k, 1), (1, 1, stride, 1),
                           ((0, 0), (0, 0), (pad, pad), (0, 0)))


def _valid_count(size: int, k: int, stride: int, pad: int) -> np.ndarray:
  """Number of real (unpadded) pixels in each window along one axis."""
  starts = np.arange(0, size + 2 * pad - k + 1, stride) - pad
  return (np.minimum(starts + k, size) - np.maximum(starts, 0)).astype(np.float32)


def avg_pool(x: jax.Array, k: int, stride: int, pad: int, count_include_pad: bool) -> jax.Array:
  """``nn.AvgPool2d(k, stride, pad, count_include_pad=...)``."""
  total = _window_sum(x, k, stride, pad)
  if count_include_pad or pad == 0:
    return total / (k * k)
  count = np.outer(_valid_count(x.shape[1], k, stride, pad),
                   _valid_count(x.shape[2], k, stride, pad))
  return total / count[None, :, :, None]


def drop_path(x: jax.Array, keep: jax.Array | float, key: jax.Array) -> jax.Array:
  """Scheduled drop-path: zero whole samples with prob ``1 - keep``, scale the rest by 1/keep."""
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0)


# -- composite ops: each an (init, apply) pair ----------------------------------------------------


def conv_bn_init(key: jax.Array, c_in: int, c_out: int, kh: int, kw: int) -> tuple[Params, Stats]:
  """Conv (no bias) followed by BN: ``({'conv', 'bn'}, {'bn'})``."""
  bn_p, bn_s = batch_norm_init(c_out)
  return {'conv': conv_init(key, kh, kw, c_in, c_out), 'bn': bn_p}, {'bn': bn_s}


def relu_conv_bn_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int | tuple,
                       padding, train: bool) -> tuple[jax.Array, Stats]:
  """ReLU -> conv -> BN (PT ``ReLUConvBN``)."""
  y = conv2d(jax.nn.relu(x), params['conv'], stride, padding)
  y, bn = batch_norm(params['bn'], stats['bn'], y, train=train)
  return y, {'bn': bn}


def factorized_reduce_init(key: jax.Array, c_in: int, c_out: int,
                           stride: int = 2) -> tuple[Params, Stats]:
  """Two stride-2 1x1 convs to ``c_out / 2`` each, offset by one pixel, then BN."""
  del stride
  if c_out % 2:
    raise ValueError(f'FactorizedReduce needs an even number of output channels, got {c_out}')
  k1, k2 = jax.random.split(key)
  bn_p, bn_s = batch_norm_init(c_out)
  return ({'conv1': conv_init(k1, 1, 1, c_in, c_out // 2),
           'conv2': conv_init(k2, 1, 1, c_in, c_out // 2), 'bn': bn_p}, {'bn': bn_s})


def factorized_reduce_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int = 2,
                            train: bool) -> tuple[jax.Array, Stats]:
  """PT ``FactorizedReduce`` (no ReLU inside): ``float32[B, H, W, C_in] -> [B, H/2, W/2, C_out]``.

  Path 2 sees the image shifted by one pixel (pad bottom/right with zeros, drop the first
  row/column), so the two halves of the output sample complementary pixels.
  """
  del stride
  shifted = jnp.pad(x[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
  y = jnp.concatenate([conv2d(x, params['conv1'], 2), conv2d(shifted, params['conv2'], 2)], -1)
  y, bn = batch_norm(params['bn'], stats['bn'], y, train=train)
  return y, {'bn': bn}


def sep_conv_init(key: jax.Array, c_in: int, c_out: int, stride: int = 1, *,
                  kernel: int) -> tuple[Params, Stats]:
  """PT ``SepConv``: two (dw k x k, pw 1x1, BN) stacks; only the last pw changes channels."""
  del stride
  k1, k2, k3, k4 = jax.random.split(key, 4)
  bn1_p, bn1_s = batch_norm_init(c_in)
  bn2_p, bn2_s = batch_norm_init(c_out)
  params = {'dw1': conv_init(k1, kernel, kernel, c_in, c_in, groups=c_in),
            'pw1': conv_init(k2, 1, 1, c_in, c_in), 'bn1': bn1_p,
            'dw2': conv_init(k3, kernel, kernel, c_in, c_in, groups=c_in),
            'pw2': conv_init(k4, 1, 1, c_in, c_out), 'bn2': bn2_p}
  return params, {'bn1': bn1_s, 'bn2': bn2_s}


def sep_conv_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int, train: bool,
                   kernel: int) -> tuple[jax.Array, Stats]:
  """ReLU -> dw(k, stride) -> pw -> BN -> ReLU -> dw(k) -> pw -> BN."""
  p = kernel // 2
  pad = ((p, p), (p, p))
  c_in = x.shape[-1]
  y = conv2d(jax.nn.relu(x), params['dw1'], stride, pad, groups=c_in)
  y = conv2d(y, params['pw1'])
  y, bn1 = batch_norm(params['bn1'], stats['bn1'], y, train=train)
  y = conv2d(jax.nn.relu(y), params['dw2'], 1, pad, groups=c_in)
  y = conv2d(y, params['pw2'])
  y, bn2 = batch_norm(params['bn2'], stats['bn2'], y, train=train)
  return y, {'bn1': bn1, 'bn2': bn2}


def conv_init_op(key: jax.Array, c_in: int, c_out: int, stride: int = 1, *,
                 kernel: int) -> tuple[Params, Stats]:
  """ReLU-Conv(k x k)-BN (11-op ``conv_1x1`` / ``conv_3x3``)."""
  del stride
  return conv_bn_init(key, c_in, c_out, kernel, kernel)


def conv_apply_op(params: Params, stats: Stats, x: jax.Array, *, stride: int, train: bool,
                  kernel: int) -> tuple[jax.Array, Stats]:
  p = kernel // 2
  return relu_conv_bn_apply(params, stats, x, stride=stride, padding=((p, p), (p, p)),
                            train=train)


def relu_conv_bn_apply_many(params: Sequence[Params], stats: Sequence[Stats], x: jax.Array, *,
                            stride: int, train: bool) -> tuple[list[jax.Array], list[Stats]]:
  """Several ReLU-Conv(k x k)-BN ops with one kernel size on one input, as a single conv.

  Same math as applying each op (BatchNorm is per channel, so normalising the concatenated
  output with concatenated parameters and statistics changes nothing), but one wide conv runs
  faster on CPU than several narrow ones, and its input gradient comes out already summed.

  Returns:
    ``([y_i], [stats_i])`` in the order of ``params``.
  """
  widths = [p['conv'].shape[-1] for p in params]
  cat = lambda trees: jax.tree.map(lambda *a: jnp.concatenate(a, axis=-1), *trees)
  y, merged = conv_apply_op(cat(params), cat(stats), x, stride=stride, train=train,
                            kernel=params[0]['conv'].shape[0])
  splits = np.cumsum(widths)[:-1].tolist()
  ys = jnp.split(y, splits, axis=-1)
  new_stats = [jax.tree.map(lambda a, i=i: jnp.split(a, splits, axis=-1)[i], merged)
               for i in range(len(params))]
  return ys, new_stats


def conv_1k_k1_init(key: jax.Array, c_in: int, c_out: int, stride: int = 1, *,
                    kernel: int) -> tuple[Params, Stats]:
  """ReLU-Conv(1 x k)-BN-ReLU-Conv(k x 1)-BN; PT builds both convs C -> C."""
  del stride
  if c_in != c_out:
    raise ValueError(f'conv_1x{kernel}_{kernel}x1 maps C -> C (PT), got {c_in} -> {c_out}')
  k1, k2 = jax.random.split(key)
  p1, s1 = conv_bn_init(k1, c_in, c_out, 1, kernel)
  p2, s2 = conv_bn_init(k2, c_out, c_out, kernel, 1)
  return {'a': p1, 'b': p2}, {'a': s1, 'b': s2}


def conv_1k_k1_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int, train: bool,
                     kernel: int) -> tuple[jax.Array, Stats]:
  p = kernel // 2
  y, sa = relu_conv_bn_apply(params['a'], stats['a'], x, stride=(1, stride),
                             padding=((0, 0), (p, p)), train=train)
  y, sb = relu_conv_bn_apply(params['b'], stats['b'], y, stride=(stride, 1),
                             padding=((p, p), (0, 0)), train=train)
  return y, {'a': sa, 'b': sb}


def no_params_init(key: jax.Array, c_in: int, c_out: int, stride: int = 1) -> tuple[Params, Stats]:
  """Init of a parameter-free op (pools): checks that it does not need to change channels."""
  del key, stride
  if c_in != c_out:
    raise ValueError(f'a pooling op keeps channels; got {c_in} -> {c_out} (calibrate first)')
  return {}, {}


def pool_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int, train: bool,
               kind: str, kernel: int, count_include_pad: bool = True) -> tuple[jax.Array, Stats]:
  """Max/avg pool with padding ``k // 2`` (3x3, 5x5) or, for 2x2, zero-padding bottom/right.

  The 2x2 pools of PT-V1 pad with explicit zeros before pooling (a TF-'SAME'-like output
  size), so padded zeros take part in both the max and the mean.
  """
  del params, train
  if kernel % 2 == 0:
    x = jnp.pad(x, ((0, 0), (0, kernel - 1), (0, kernel - 1), (0, 0)))
    pad = 0
  else:
    pad = kernel // 2
  if kind == 'max':
    return max_pool(x, kernel, stride, pad), stats
  return avg_pool(x, kernel, stride, pad, count_include_pad), stats


def identity_init(key: jax.Array, c_in: int, c_out: int, stride: int = 1) -> tuple[Params, Stats]:
  """Identity; at stride 2 a FactorizedReduce (PT), so only then it has parameters."""
  if stride == 1:
    return no_params_init(key, c_in, c_out)
  return factorized_reduce_init(key, c_in, c_out)


def identity_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int,
                   train: bool) -> tuple[jax.Array, Stats]:
  if stride == 1:
    return x, stats
  return factorized_reduce_apply(params, stats, x, train=train)


# -- registry -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
  """One candidate operation of a space.

  Attributes:
    name: the space's op name.
    init: ``(key, c_in, c_out, stride) -> (params, stats)``.
    apply: ``(params, stats, x, *, stride, train) -> (y, stats)``.
    is_identity: True for the identity op (drop-path may exempt it, spec §6.3).
    conv_kernel: k for the ReLU-Conv(k x k)-BN ops; branches applying such ops with the same
      k and stride to the same input can run as one conv (``relu_conv_bn_apply_many``).
  """
  name: str
  init: Callable[..., tuple[Params, Stats]]
  apply: Callable[..., tuple[jax.Array, Stats]]
  is_identity: bool = False
  conv_kernel: int | None = None


def _sep(name: str, k: int) -> Op:
  return Op(name, functools.partial(sep_conv_init, kernel=k),
            functools.partial(sep_conv_apply, kernel=k))


def _pool(name: str, kind: str, k: int, count_include_pad: bool = True) -> Op:
  return Op(name, no_params_init,
            functools.partial(pool_apply, kind=kind, kernel=k, count_include_pad=count_include_pad))


IDENTITY = Op('identity', identity_init, identity_apply, is_identity=True)


def ws_ops(avg_pool_count_include_pad: bool = False) -> tuple[Op, ...]:
  """The 5 WS ops in id order. PT's WS ``avg_pool_3x3`` excludes padded zeros."""
  return (_sep('sep_conv_3x3', 3), _sep('sep_conv_5x5', 5),
          _pool('avg_pool_3x3', 'avg', 3, avg_pool_count_include_pad),
          _pool('max_pool_3x3', 'max', 3), IDENTITY)


def nao_ops(avg_pool_count_include_pad: bool = True) -> tuple[Op, ...]:
  """The 11 NAONet ops in id order. PT's 11-op avg pools count padded zeros (TF's do not)."""
  return (IDENTITY,
          Op('conv_1x1', functools.partial(conv_init_op, kernel=1),
             functools.partial(conv_apply_op, kernel=1), conv_kernel=1),
          Op('conv_3x3', functools.partial(conv_init_op, kernel=3),
             functools.partial(conv_apply_op, kernel=3), conv_kernel=3),
          Op('conv_1x3_3x1', functools.partial(conv_1k_k1_init, kernel=3),
             functools.partial(conv_1k_k1_apply, kernel=3)),
          Op('conv_1x7_7x1', functools.partial(conv_1k_k1_init, kernel=7),
             functools.partial(conv_1k_k1_apply, kernel=7)),
          _pool('max_pool_2x2', 'max', 2), _pool('max_pool_3x3', 'max', 3),
          _pool('max_pool_5x5', 'max', 5),
          _pool('avg_pool_2x2', 'avg', 2, avg_pool_count_include_pad),
          _pool('avg_pool_3x3', 'avg', 3, avg_pool_count_include_pad),
          _pool('avg_pool_5x5', 'avg', 5, avg_pool_count_include_pad))


def op_table(op_names: Sequence[str], avg_pool_exclude_pad: bool = False) -> tuple[Op, ...]:
  """Returns the ops of a space, indexed by op id, from its ``space.ops`` names.

  Args:
    op_names: ``space.ops`` of the 5-op or the 11-op space.
    avg_pool_exclude_pad: average only over real pixels in every avg pool, as TF does
      (spec §6.2); the PT default counts padded zeros in the 11-op space.

  Raises:
    ValueError: for a list of op names that is neither space.
  """
  op_names = tuple(op_names)
  for table in (ws_ops(avg_pool_count_include_pad=False),
                nao_ops(avg_pool_count_include_pad=not avg_pool_exclude_pad)):
    if tuple(op.name for op in table) == op_names:
      return table
  raise ValueError(f'no op library for ops {op_names}')


def calibrate_init(key: jax.Array, c0: int, c1: int, c: int, *,
                   reduce_x0: bool) -> tuple[Params, Stats]:
  """PT ``MaybeCalibrateSize`` for cell inputs with ``c0`` / ``c1`` channels.

  Input 0: if its spatial size is twice input 1's (``reduce_x0``; the previous cell reduced) ->
  ReLU -> FactorizedReduce to ``c``; elif ``c0 != c`` -> ReLU-1x1-BN. Input 1: if ``c1 != c`` ->
  ReLU-1x1-BN. Returns params/stats with keys ``'x0'``/``'x1'`` only where a transform exists.
  """
  k0, k1 = jax.random.split(key)
  params, stats = {}, {}
  if reduce_x0:
    params['x0'], stats['x0'] = factorized_reduce_init(k0, c0, c)
  elif c0 != c:
    params['x0'], stats['x0'] = conv_bn_init(k0, c0, c, 1, 1)
  if c1 != c:
    params['x1'], stats['x1'] = conv_bn_init(k1, c1, c, 1, 1)
  return params, stats


def calibrate_apply(params: Params, stats: Stats, s0: jax.Array, s1: jax.Array, *,
                    train: bool) -> tuple[jax.Array, jax.Array, Stats]:
  """Applies ``calibrate_init``'s transforms: ``(s0, s1) -> (s0', s1')``, both ``[B, H, W, c]``."""
  new = {}
  if 'x0' in params:
    if s0.shape[1] != s1.shape[1]:
      s0, new['x0'] = factorized_reduce_apply(params['x0'], stats['x0'], jax.nn.relu(s0),
                                              train=train)
    else:
      s0, new['x0'] = relu_conv_bn_apply(params['x0'], stats['x0'], s0, stride=1,
                                         padding=((0, 0), (0, 0)), train=train)
  if 'x1' in params:
    s1, new['x1'] = relu_conv_bn_apply(params['x1'], stats['x1'], s1, stride=1,
                                       padding=((0, 0), (0, 0)), train=train)
  return s0, s1, new
