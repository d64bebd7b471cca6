"""A committed site's backward pass: the convolution gradients StoMPP zeroes are not computed.

At p = 1 every entry of a StoMPP site is frozen, so its binarizers pass no gradient to the latent
kernel, nor to an input the site binarizes; XLA would still compute the convolution's weight
and input gradients and then multiply them by zero. `conv` is a binary layer's convolution
whose backward pass branches (`jax.lax.cond`) on the site being committed and skips them, as an
eager framework's autograd skips tensors that need no gradient. The gradients it returns at
p = 1 are the zeros the binarizers would have made of them.

Why its own gradients: XLA:CPU leaves a convolution inside a conditional branch in the layout
JAX's transpose rules give it (`f01b_i01o->01bf` for the weight gradient), which it does not
hand to Eigen, and ran it 30-90x slower. The gradients here are convolutions in the canonical
layouts (`b01f_01io->b01f`, with explicit transposes), as fast as XLA's own outside a branch;
they equal XLA's up to float32 summation order. Groups of one only (the zoo's binary convs).
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: Any,
          dimension_numbers=_NHWC) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=dimension_numbers)


def input_grad(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: tuple[int, ...],
               padding: Any) -> jax.Array:
  """d(conv(x, kernel)) / dx applied to the cotangent g: (B, H, W, Cin). The kernel is given
  as HWOI, whose transpose rule yields the canonical kernel layout."""
  kernel_hwoi = jnp.transpose(kernel, (0, 1, 3, 2))
  (dx,) = jax.linear_transpose(
      lambda x: _conv(x, kernel_hwoi, strides, padding, ('NHWC', 'HWOI', 'NHWC')), x)(g)
  return dx


def kernel_grad(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: tuple[int, ...],
                padding: Any) -> jax.Array:
  """d(conv(x, kernel)) / dkernel applied to the cotangent g: (kh, kw, Cin, Cout). The input
  as CHWN, the kernel as IHWO and the output as HWNC make the transpose rule's convolution
  canonical (batch = Cin, feature = B)."""
  x_chwn = jnp.transpose(x, (3, 1, 2, 0))
  (dkernel,) = jax.linear_transpose(
      lambda k: _conv(x_chwn, k, strides, padding, ('CHWN', 'IHWO', 'HWNC')),
      jnp.transpose(kernel, (2, 0, 1, 3)))(jnp.transpose(g, (1, 2, 0, 3)))
  return jnp.transpose(dkernel, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv(x: jax.Array, kernel: jax.Array, committed: jax.Array, strides: tuple[int, ...],
         padding: Any, binarized_input: bool) -> jax.Array:
  """conv(x, kernel) (NHWC, HWIO, groups of one) whose backward pass skips what a committed
  site's binarizers zero.

  Args:
    x: (B, H, W, Cin), the layer's input as it computes with it.
    kernel: (kh, kw, Cin, Cout), the binarized kernel.
    committed: bool scalar: every entry of the site frozen (p = 1).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or a tuple of (low, high) pairs.
    binarized_input: x is binarized by this site (its gradient is zeroed too when committed);
      else x's gradient is always computed.

  Returns:
    (B, H', W', Cout), exactly `lax.conv_general_dilated`'s output.
  """
  del committed, binarized_input
  return _conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, committed, strides, padding, binarized_input):
  del binarized_input
  return _conv(x, kernel, strides, padding), (x, kernel, committed)


def _conv_bwd(strides, padding, binarized_input, saved, g):
  x, kernel, committed = saved
  grads = lambda fn: fn(x, kernel, g, strides, padding)
  if binarized_input:
    dx, dkernel = lax.cond(committed,
                           lambda: (jnp.zeros_like(x), jnp.zeros_like(kernel)),
                           lambda: (grads(input_grad), grads(kernel_grad)))
  else:
    dx = grads(input_grad)
    dkernel = lax.cond(committed, lambda: jnp.zeros_like(kernel), lambda: grads(kernel_grad))
  return dx, dkernel, None


conv.defvjp(_conv_fwd, _conv_bwd)
