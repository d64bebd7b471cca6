"""BinaryConv / BinaryDense and site discovery, against docs/method.md.

For each method the layer must compute with
    fp:          kernel, input unchanged
    ste:         sign(kernel), sign(input)                 grads: identity (kernel), clipped (input)
    stompp:      M * sign(u) + (1 - M) * clip(u, -1, 1)     grads: (1 - M) * 1[|u| <= 1]
    stompp_ste:  same forward                               grads: 1[|u| <= 1]
where M is the site's frozen mask (tested in test_masks.py) and the input mask is shared over the
batch. Expected outputs and gradients are built here from these formulas with plain lax ops.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stompp_jax import layers
from stompp_jax import sites
from stompp_jax.binary import context
from stompp_jax.binary import schedule
from stompp_jax.models import inspect

KEY = jax.random.key(3)
STEP = 50  # one site, linear schedule over T = 100 steps and span [0, 1]: p = 0.5
P_AT_STEP = 0.5


class _Wrapped(nn.Module):
  """One binary layer named 'layer', so its path is 'layer'."""
  kind: str
  binarize_input: bool = False
  dtype: object = None

  @nn.compact
  def __call__(self, x, ctx=None):
    cls = layers.BinaryConv if self.kind == 'conv' else layers.BinaryDense
    kwargs = dict(use_bias=False) if self.kind == 'dense' else {}
    return cls(features=4, binarize_input=self.binarize_input, dtype=self.dtype, name='layer',
               **kwargs)(x, ctx)


def _ctx(method, step=STEP, sites=(('layer',),), fully_binary=False, **config):
  cfg = context.BinarizationConfig(
      method=method, sites=sites, **config,
      schedule=schedule.ScheduleConfig(total_steps=100, shape='linear', span_end=1.0))
  return context.BinarizationContext(step=jnp.int32(step), key=KEY, config=cfg,
                                     fully_binary=fully_binary)


def _inputs(kind, dtype=jnp.float32):
  """Input and latent kernel with entries on both sides of |u| = 1."""
  rng = np.random.default_rng(0)
  x_shape, k_shape = ((2, 5, 5, 3), (3, 3, 3, 4)) if kind == 'conv' else ((3, 12), (12, 4))
  x = jnp.asarray(rng.normal(0, 1.5, x_shape), dtype)
  kernel = jnp.asarray(rng.normal(0, 1.5, k_shape), jnp.float32)
  return x, kernel


def _plain_layer(kind, x, kernel):
  if kind == 'conv':
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return x @ kernel


def _formula(method, u, frozen, tensor):
  """(binarized u, d binarized / d u) from docs/method.md, elementwise, numpy."""
  u = np.asarray(u, np.float32)
  sign, clip, in_range = np.where(u >= 0, 1.0, -1.0), np.clip(u, -1, 1), np.abs(u) <= 1
  if method == 'fp':
    return u, np.ones_like(u)
  if method == 'ste':  # identity STE for kernels, clipped STE for activations
    return sign, np.ones_like(u) if tensor == 'kernel' else in_range.astype(np.float32)
  value = np.where(frozen, sign, clip)
  passes = in_range & ~frozen if method == 'stompp' else in_range
  return value, passes.astype(np.float32)


_site_mask = jax.jit(context.site_frozen_mask, static_argnums=(1, 2, 3))


@functools.partial(jax.jit, static_argnums=0)
def _plain_vjp(kind, x, kernel):
  """Output of the plain layer and its (dx, dkernel) for the cotangent ones."""
  y, pullback = jax.vjp(lambda a, b: _plain_layer(kind, a, b), x, kernel)
  return (y, *pullback(jnp.ones_like(y)))


def _expected(method, kind, binarize_input, x, kernel, ctx):
  """Expected output and (dx, dkernel) for the cotangent ones, from the formulas."""
  k_mask = np.asarray(_site_mask(ctx, 0, 'kernel', kernel.shape))
  x_mask = np.asarray(_site_mask(ctx, 0, 'input', x.shape[1:]))
  bk, dk = _formula(method, kernel, k_mask, 'kernel')
  bx, dxx = _formula(method, x, x_mask, 'input') if binarize_input else (np.asarray(x), 1.0)
  y, gx, gk = _plain_vjp(kind, jnp.asarray(bx, x.dtype), jnp.asarray(bk, x.dtype))
  return y, np.asarray(gx, np.float32) * dxx, np.asarray(gk, np.float32) * dk, k_mask


def _apply(module, x, kernel, ctx):
  variables = {'params': {'layer': {'kernel': kernel}}}
  return module.apply(variables, x, ctx, mutable=['binary_stats'])


_apply_jit = jax.jit(_apply, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _apply_and_grads(module, x, kernel, ctx):
  """(output, binary_stats state, d sum(output) / dx, d sum(output) / dkernel)."""
  y, state = _apply(module, x, kernel, ctx)
  loss = lambda x, k: jnp.sum(_apply(module, x, k, ctx)[0].astype(jnp.float32))
  return (y, state, *jax.grad(loss, argnums=(0, 1))(x, kernel))


@pytest.mark.parametrize('kind', ['conv', 'dense'])
@pytest.mark.parametrize('binarize_input', [False, True])
@pytest.mark.parametrize('method', context.METHODS)
def test_layer_values_grads_and_stats(kind, binarize_input, method):
  module = _Wrapped(kind, binarize_input)
  x, kernel = _inputs(kind)
  ctx = _ctx(method)
  y, state, gx, gk = _apply_and_grads(module, x, kernel, ctx)
  y_ref, gx_ref, gk_ref, k_mask = _expected(method, kind, binarize_input, x, kernel, ctx)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gk, gk_ref, rtol=1e-6, atol=1e-5)

  if method == 'fp':
    assert 'binary_stats' not in state
  else:
    p = float(state['binary_stats']['layer']['frozen_fraction'])
    assert p == pytest.approx(1.0 if method == 'ste' else P_AT_STEP, abs=1e-6)
  if method in ('stompp', 'stompp_ste'):
    assert 0 < k_mask.mean() < 1   # the test sees a partial mask
    assert np.any(np.abs(np.asarray(kernel)) > 1) and np.any(np.abs(np.asarray(kernel)) < 1)


@pytest.mark.parametrize('kind', ['conv', 'dense'])
def test_layer_stats_follow_the_step(kind):
  module = _Wrapped(kind, True)
  x, kernel = _inputs(kind)
  for step, p in [(0, 0.0), (25, 0.25), (99, 0.99), (100, 1.0)]:
    _, state = _apply_jit(module, x, kernel, _ctx('stompp', step))
    assert float(state['binary_stats']['layer']['frozen_fraction']) == pytest.approx(p, abs=1e-6)


@pytest.mark.parametrize('kind', ['conv', 'dense'])
def test_layer_is_full_precision_without_context_or_when_excluded(kind):
  module = _Wrapped(kind, True)
  x, kernel = _inputs(kind)
  y_plain = _plain_layer(kind, x, kernel)
  y, state = _apply_jit(module, x, kernel, None)
  np.testing.assert_allclose(y, y_plain, rtol=1e-6, atol=1e-5)
  assert 'binary_stats' not in state
  excluded = _ctx('stompp', sites=(('other',),))  # The layer is not in the site table.
  y, state = _apply_jit(module, x, kernel, excluded)
  np.testing.assert_allclose(y, y_plain, rtol=1e-6, atol=1e-5)
  assert 'binary_stats' not in state


@pytest.mark.parametrize('method', ['stompp', 'stompp_ste', 'ste'])
def test_fully_binary_context_uses_sign_everywhere(method):
  module = _Wrapped('conv', True)
  x, kernel = _inputs('conv')
  y, _ = _apply_jit(module, x, kernel, _ctx(method, step=0, fully_binary=True))
  y_ref = _plain_layer('conv', jnp.where(x >= 0, 1.0, -1.0), jnp.where(kernel >= 0, 1.0, -1.0))
  np.testing.assert_array_equal(y, y_ref)  # sums of +-1: exact


@pytest.mark.parametrize('kind', ['conv', 'dense'])
def test_bfloat16_compute_dtype(kind):
  method = 'stompp'  # the bfloat16 binarizers of every method: test_binarize.py
  x, kernel = _inputs(kind, jnp.bfloat16)
  ctx = _ctx(method)
  for module in (_Wrapped(kind, True), _Wrapped(kind, True, dtype=jnp.bfloat16)):
    y, _, gx, gk = _apply_and_grads(module, x, kernel, ctx)
    assert y.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16
    assert gk.dtype == jnp.float32  # the latent (param) dtype
    y_ref, _, _, _ = _expected(method, kind, True, x, kernel.astype(jnp.bfloat16), ctx)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=2e-2, atol=5e-2)
  # float32 input with a bfloat16 layer is computed in bfloat16.
  y, _ = _apply_jit(_Wrapped(kind, True, dtype=jnp.bfloat16), x.astype(jnp.float32), kernel, ctx)
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize('per_example', [False, True], ids=['shared_masks', 'per_example_masks'])
def test_binary_conv_with_sharded_batch_over_8_devices(per_example):
  """The same values and kernel gradient with the batch split over 8 devices as on one: the
  input masks (shared, or one per example) do not depend on the device count."""
  mesh = Mesh(np.array(jax.devices()), ('data',))
  module = _Wrapped('conv', True)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 5, 5, 3)), jnp.float32)
  _, kernel = _inputs('conv')
  ctx = _ctx('stompp', per_example_activation_masks=per_example)
  input_mask = np.asarray(context.site_frozen_mask(ctx, 0, 'input',
                                                   x.shape if per_example else x.shape[1:]))
  assert 0.2 < input_mask.mean() < 0.8  # Half frozen at STEP: the masks matter.
  if per_example:
    assert len({row.tobytes() for row in input_mask}) == 8  # One mask per example.

  @jax.jit
  def fwd_grad(x, kernel, ctx):
    loss = lambda k: jnp.sum(_apply(module, x, k, ctx)[0] ** 2)
    return _apply(module, x, kernel, ctx)[0], jax.grad(loss)(kernel)

  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  y, gk = fwd_grad(xs, kernel, ctx)
  y_ref, gk_ref = fwd_grad(x, kernel, ctx)
  assert len(y.sharding.device_set) == 8
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gk, gk_ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Site discovery


class _Net(nn.Module):
  """Layers are defined in one order, called in another (neither alphabetical); the head is
  called twice."""

  def setup(self):
    self.alpha_head = layers.BinaryDense(features=10)
    self.zeta = layers.BinaryConv(features=6, binarize_input=True)
    self.stem = layers.BinaryConv(features=4)
    self.beta = layers.BinaryConv(features=8, strides=(2, 2), binarize_input=True)
    self.plain = nn.Dense(3)

  def __call__(self, x, ctx=None):
    x = self.stem(x, ctx)
    x = self.zeta(x, ctx)
    x = self.beta(x, ctx)
    x = self.plain(x)
    x = x.mean(axis=(1, 2))
    return self.alpha_head(self.alpha_head(x, ctx)[:, :3], ctx)


def test_discover_sites_in_call_order():
  net = _Net()
  rules = context.BinaryRules(exclude=('^stem$',))
  found = sites.discover_sites(inspect.trace_model(net, (8, 8, 3)), rules)
  assert [s.path for s in found] == [('zeta',), ('beta',), ('alpha_head',)]
  assert [s.kind for s in found] == ['conv', 'conv', 'dense']
  assert [s.kernel_shape for s in found] == [(3, 3, 4, 6), (3, 3, 6, 8), (3, 10)]
  assert [s.input_shape for s in found] == [(8, 8, 4), (8, 8, 6), (3,)]
  params = inspect.trace_model(net, (8, 8, 3)).variables['params']
  assert sites.site_tree(params, found) == {
      'stem': {'kernel': None}, 'zeta': {'kernel': 0}, 'beta': {'kernel': 1},
      'plain': {'kernel': None, 'bias': None}, 'alpha_head': {'kernel': 2, 'bias': None}}
  table = sites.site_table(found).splitlines()
  assert table[0].split() == ['site', 'module', 'path', 'kernel', 'shape', 'input', 'shape']
  assert table[1].split() == ['0', 'zeta', '3x3x4x6', '8x8x4']
  assert len(table) == 4


def test_discover_sites_nested_paths_and_all_layers_by_default():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, ctx=None):
      x = layers.BinaryConv(features=4, name='conv1')(x, ctx)
      return layers.BinaryConv(features=4, name='conv2')(x, ctx)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, ctx=None):
      x = Block(name='stage1_block0')(x, ctx)
      return Block(name='stage1_block1')(x, ctx)

  found = sites.discover_sites(inspect.trace_model(Model(), (4, 4, 2)), context.BinaryRules())
  assert [s.path for s in found] == [('stage1_block0', 'conv1'), ('stage1_block0', 'conv2'),
                                     ('stage1_block1', 'conv1'), ('stage1_block1', 'conv2')]
  # The discovered paths are the layers' own: a context built from them binarizes all four.
  cfg = context.BinarizationConfig(method='ste', sites=tuple(s.path for s in found),
                                   schedule=schedule.ScheduleConfig(total_steps=10))
  ctx = context.BinarizationContext(step=jnp.int32(0), key=KEY, config=cfg)
  variables = Model().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  _, state = Model().apply(variables, jnp.ones((1, 4, 4, 2)), ctx, mutable=['binary_stats'])
  assert len(jax.tree_util.tree_leaves(state['binary_stats'])) == 4
