"""binary/committed.py: a committed site's convolution gradients are skipped, the others equal
XLA's own, and the convolutions of the backward pass are in the layout XLA:CPU runs fast."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import compiler
from stompp_jax.binary import committed

CASES = [  # x shape, kernel shape, strides, padding
    ((4, 9, 9, 3), (3, 3, 3, 5), (1, 1), 'SAME'),
    ((4, 9, 8, 3), (3, 3, 3, 5), (2, 2), 'SAME'),
    ((2, 7, 7, 4), (1, 1, 4, 6), (2, 2), 'VALID'),
    ((2, 8, 8, 2), (3, 2, 2, 3), (1, 2), ((1, 0), (0, 2))),
]


def _native(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _arrays(x_shape, kernel_shape, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
          jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32))


@pytest.mark.parametrize('x_shape,kernel_shape,strides,padding', CASES)
@pytest.mark.parametrize('binarized_input', [True, False])
def test_values_and_gradients_of_an_uncommitted_site_are_xlas(x_shape, kernel_shape, strides,
                                                               padding, binarized_input):
  x, kernel = _arrays(x_shape, kernel_shape)
  want, native_vjp = jax.vjp(lambda x, k: _native(x, k, strides, padding), x, kernel)
  got, vjp = jax.vjp(lambda x, k: committed.conv(x, k, jnp.bool_(False), strides, padding,
                                                 binarized_input), x, kernel)
  assert got.tobytes() == want.tobytes()
  g = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
  for name, a, b in zip(('input', 'kernel'), vjp(g), native_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('binarized_input', [True, False])
def test_a_committed_site_passes_no_kernel_gradient_and_none_to_an_input_it_binarizes(
    binarized_input):
  x_shape, kernel_shape, strides, padding = CASES[1]
  x, kernel = _arrays(x_shape, kernel_shape)
  y, vjp = jax.vjp(lambda x, k: committed.conv(x, k, jnp.bool_(True), strides, padding,
                                               binarized_input), x, kernel)
  dx, dkernel = vjp(jnp.ones_like(y))
  assert not np.any(dkernel)
  if binarized_input:
    assert not np.any(dx)
  else:
    np.testing.assert_allclose(
        dx, jax.vjp(lambda x: _native(x, kernel, strides, padding), x)[1](jnp.ones_like(y))[0],
        rtol=1e-5, atol=1e-5)


def test_the_backward_convolutions_are_canonical_and_inside_the_branch():
  x, kernel = _arrays((8, 16, 16, 16), (3, 3, 16, 32))
  loss = lambda x, k, c: jnp.sum(committed.conv(x, k, c, (1, 1), 'SAME', True) ** 2)
  hlo = compiler.jit(jax.grad(loss, (0, 1))).lower(x, kernel, jnp.bool_(False)).compile().as_text()
  labels = re.findall(r' convolution\(.*dim_labels=([\w>-]+)', hlo)
  assert len(labels) == 3, labels  # Forward, input gradient, kernel gradient.
  # XLA:CPU runs only this layout in Eigen; inside a conditional it is not rewritten into it.
  assert set(labels) == {'b01f_01io->b01f'}, labels
  assert 'conditional(' in hlo


def test_bfloat16_gradients_are_xlas_to_bfloat16_precision():
  x_shape, kernel_shape, strides, padding = CASES[1]
  x, kernel = (a.astype(jnp.bfloat16) for a in _arrays(x_shape, kernel_shape))
  want, native_vjp = jax.vjp(lambda x, k: _native(x, k, strides, padding), x, kernel)
  got, vjp = jax.vjp(lambda x, k: committed.conv(x, k, jnp.bool_(False), strides, padding,
                                                 True), x, kernel)
  g = jnp.ones_like(want)
  for a, b in zip(vjp(g), native_vjp(g)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2,
                               atol=2e-1)
