"""CPU-fast versions of op-library primitives that XLA:CPU runs slowly (same maths as ``ops``).

XLA:CPU lowers a depthwise (``feature_group_count = C``) convolution to a slow generic loop:
on ``float32[64, 32, 32, 20]`` a 3x3 depthwise conv takes ~20x longer than the same result
computed as k*k shifted multiply-adds, which XLA fuses into one elementwise loop. The weight
gradient is k*k reductions over the batch and space; written as ONE variadic ``lax.reduce`` over
the k*k products, XLA fuses them into a single pass over the data (~8x faster than k*k separate
reductions). This module offers these as a drop-in for ``ops.sep_conv_apply`` and the pools, so
the supernet can pick them (``SupernetConfig.primitives``) without touching ``ops.py``; the tests
check that they compute the same values and gradients as ``ops``. They are candidates to move
into ``ops.conv2d`` itself.

All functions take and return NHWC ``float32[B, H, W, C]`` and use PyTorch's symmetric padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from nao_jax.cnn import ops

Params = ops.Params
Stats = ops.Stats


def _taps(xp: jax.Array, k: int, stride: int, out_hw: tuple[int, int]):
  """The k*k strided windows ``xp[:, i::stride, j::stride, :]`` of output size ``out_hw``."""
  b, _, _, c = xp.shape
  ho, wo = out_hw
  for i in range(k):
    for j in range(k):
      yield i, j, lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1,
                                               j + (wo - 1) * stride + 1, c),
                            (1, stride, stride, 1))


def _depthwise_padded(xp: jax.Array, kernel: jax.Array, stride: int,
                      out_hw: tuple[int, int]) -> jax.Array:
  """Valid depthwise correlation of an already padded input (k*k fused multiply-adds)."""
  y = None
  for i, j, window in _taps(xp, kernel.shape[0], stride, out_hw):
    term = window * kernel[i, j, 0]
    y = term if y is None else y + term
  return y


def _out_hw(x_shape, k: int, stride: int, pad: int) -> tuple[int, int]:
  return tuple((n + 2 * pad - k) // stride + 1 for n in x_shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise k x k convolution, ``ops.conv2d(x, kernel, stride, ((pad, pad),) * 2, groups=C)``.

  Args:
    x: ``float32[B, H, W, C]``.
    kernel: ``float32[k, k, 1, C]`` (HWIO with one input channel per group).
    stride: spatial stride.
    pad: symmetric zero padding.

  Returns:
    ``float32[B, H', W', C]``.
  """
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return _depthwise_padded(xp, kernel, stride, _out_hw(x.shape, kernel.shape[0], stride, pad))


def _depthwise_fwd(x, kernel, stride, pad):
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  y = _depthwise_padded(xp, kernel, stride, _out_hw(x.shape, kernel.shape[0], stride, pad))
  # The padded input is the residual: the weight gradient reads it k*k times, and a pad fused
  # into each of those reads would cost bounds checks in the reduction's inner loop.
  return y, (xp, kernel)


def _depthwise_bwd(stride, pad, residuals, dy):
  xp, kernel = residuals
  k = kernel.shape[0]
  c = kernel.shape[-1]
  hp, wp = xp.shape[1:3]
  ho, wo = dy.shape[1:3]
  # dx_pad[i + s*u] += dy[u] * kernel[i]: dilate dy by the stride, pad it by k - 1 and correlate
  # with the flipped kernel (k*k fused multiply-adds again), then crop the padding.
  span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
  dyd = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (k - 1, hp - span_h, stride - 1), (k - 1, wp - span_w, stride - 1),
                 (0, 0, 0)))
  dxp = _depthwise_padded(dyd, kernel[::-1, ::-1], 1, (hp, wp))
  dx = dxp[:, pad:hp - pad, pad:wp - pad, :]
  # dkernel[i, j, c] = sum_{b, u, v} x_pad[b, i + s*u, j + s*v, c] * dy[b, u, v, c]: all k*k
  # taps in ONE variadic reduction, which XLA fuses into a single pass over x and dy.
  products = tuple(window * dy for _, _, window in _taps(xp, k, stride, (ho, wo)))
  zeros = tuple(jnp.zeros((), dy.dtype) for _ in products)
  sums = lax.reduce(products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)),
                    (0, 1, 2))
  return dx, jnp.stack(sums).reshape(k, k, 1, c)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def sep_conv_apply(params: Params, stats: Stats, x: jax.Array, *, stride: int, train: bool,
                   kernel: int) -> tuple[jax.Array, Stats]:
  """``ops.sep_conv_apply`` with ``depthwise_conv``: ReLU -> dw(k, stride) -> pw -> BN -> ReLU
  -> dw(k) -> pw -> BN."""
  p = kernel // 2
  y = depthwise_conv(jax.nn.relu(x), params['dw1'], stride, p)
  y = ops.conv2d(y, params['pw1'])
  y, bn1 = ops.batch_norm(params['bn1'], stats['bn1'], y, train=train)
  y = depthwise_conv(jax.nn.relu(y), params['dw2'], 1, p)
  y = ops.conv2d(y, params['pw2'])
  y, bn2 = ops.batch_norm(params['bn2'], stats['bn2'], y, train=train)
  return y, {'bn1': bn1, 'bn2': bn2}


def fast_op_table(table: tuple[ops.Op, ...]) -> tuple[ops.Op, ...]:
  """``table`` with each sep conv's ``apply`` replaced by the depthwise-by-shifts version."""
  out = []
  for op in table:
    if op.name.startswith('sep_conv_'):
      k = int(op.name.rsplit('x', 1)[-1])
      op = ops.Op(op.name, op.init, functools.partial(sep_conv_apply, kernel=k),
                  op.is_identity)
    out.append(op)
  return tuple(out)


__all__ = ['depthwise_conv', 'sep_conv_apply', 'fast_op_table']
