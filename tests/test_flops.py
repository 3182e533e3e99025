"""The benchmarks' FLOP counter against hand counts (it backs every ``mfu`` they print)."""

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import flops


def _conv(x, w, groups=1):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def test_counts_convolutions_matmuls_and_scan_bodies():
  x = jnp.zeros((2, 8, 8, 4))
  w = jnp.zeros((3, 3, 4, 6))
  depthwise = jnp.zeros((5, 5, 1, 4))
  m = jnp.zeros((7, 3))

  def program(x, w, depthwise, m):
    y = _conv(x, w)                        # 2 * (2*8*8*6) outputs * (3*3*4) taps
    z = _conv(x, depthwise, groups=4)      # 2 * (2*8*8*4) outputs * (5*5*1) taps
    carry, _ = lax.scan(lambda c, _: (c @ m.T @ m, None), jnp.zeros((2, 3)), None, length=5)
    return y.sum() + z.sum() + carry.sum()  # scan: 5 * (2*(2*7*3) + 2*(2*3*7))

  expected = 2 * 768 * 36 + 2 * 512 * 25 + 5 * (84 + 84)
  assert flops.jaxpr_flops(jax.make_jaxpr(jax.jit(program))(x, w, depthwise, m)) == expected
  # Forward and backward of a convolution: the input and the weight gradients are one more
  # convolution each, of the same size.
  grad = jax.make_jaxpr(jax.grad(lambda x, w: _conv(x, w).sum(), argnums=(0, 1)))(x, w)
  assert flops.jaxpr_flops(grad) == 3 * 2 * 768 * 36
