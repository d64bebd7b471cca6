"""Model zoo: published parameter counts, shapes, binarization per mode, site order and rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import layers
from stompp_jax import models
from stompp_jax import sites
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule
from stompp_jax.models import inspect

from helpers import (  # pylint: disable=g-bad-import-order
    CIFAR, EVERYTHING, IMAGENET, abstract_variables, create, model_config, num_params, site_paths)

TINY_CONVS = ('stem_conv', 'stage1_block0/conv1', 'stage1_block0/conv2', 'stage2_block0/conv1',
              'stage2_block0/conv2', 'stage2_block0/shortcut_conv')


@pytest.mark.parametrize('name, image_shape, num_classes, expected', [
    ('resnet18', IMAGENET, 1000, 11_689_512),  # torchvision
    ('resnet34', IMAGENET, 1000, 21_797_672),  # torchvision
    ('resnet50', IMAGENET, 1000, 25_557_032),  # torchvision
    ('mobilenet_v2', IMAGENET, 1000, 3_504_872),  # torchvision
])
def test_published_parameter_counts_and_output_shapes(name, image_shape, num_classes, expected):
  model = create(name, image_shape, num_classes, mode='fp')
  variables = abstract_variables(model, image_shape)
  assert num_params(variables) == expected
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                          inspect.sample_input(image_shape, batch_size=2))
  assert (logits.shape, logits.dtype) == ((2, num_classes), jnp.float32)


@pytest.mark.parametrize('name, expected_millions', [('resnet20', 0.27), ('resnet56', 0.85),
                                                     ('resnet110', 1.7)])
def test_cifar_resnets_have_about_the_published_size(name, expected_millions):
  # He et al. 2016, Table 6 (identity shortcuts; the 1x1 projections add 0.3 to 2 %).
  count = num_params(abstract_variables(create(name), CIFAR))
  assert count == pytest.approx(expected_millions * 1e6, rel=0.03)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_every_model_maps_cifar_images_to_logits(name):
  model = create(name, num_classes=100)
  variables = abstract_variables(model, CIFAR)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0],
                          variables, inspect.sample_input(CIFAR, batch_size=3))
  assert (logits.shape, logits.dtype) == ((3, 100), jnp.float32)


def test_auto_stem_follows_the_image_size():
  def stem_kernel(image_shape, stem):
    model = create('resnet18', image_shape, stem=stem)
    return abstract_variables(model, image_shape)['params']['stem_conv']['kernel'].shape

  assert stem_kernel((64, 64, 3), 'auto') == (3, 3, 3, 64)
  assert stem_kernel((96, 96, 3), 'auto') == (7, 7, 3, 64)
  assert stem_kernel(CIFAR, 'imagenet') == (7, 7, 3, 64)


def test_unknown_model_name_is_a_one_line_error_listing_the_models():
  with pytest.raises(ValueError) as error:
    models.check_model_config(model_config('resnet19'))
  assert '\n' not in str(error.value)
  assert all(name in str(error.value) for name in models.MODEL_NAMES)


def test_width_multiplier_is_for_mobilenet_only():
  with pytest.raises(ValueError, match='mobilenet_v2 only'):
    models.check_model_config(model_config('resnet20', width_multiplier=0.5))
  wide = num_params(abstract_variables(create('mobilenet_v2', width_multiplier=1.4), CIFAR))
  assert wide > num_params(abstract_variables(create('mobilenet_v2'), CIFAR))


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_params_stats_and_logits():
  model = create('tiny_resnet', dtype='bfloat16', mode='bnn')
  variables = abstract_variables(model, CIFAR)
  compute_dtypes = set()

  def record(next_fun, args, kwargs, call):
    out = next_fun(*args, **kwargs)
    if call.method_name == 'binarized':
      compute_dtypes.update(t.dtype for t in out)
    return out

  with nn.intercept_methods(record):
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables,
        inspect.sample_input(CIFAR, batch_size=2))
  assert compute_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves((variables, state))} == {jnp.dtype(jnp.float32)}


def test_batch_norm_follows_every_conv_with_momentum_0_9_and_epsilon_1e_5():
  model = create('resnet50', IMAGENET, 1000)
  calls = []

  def record(next_fun, args, kwargs, call):
    if call.method_name == '__call__' and isinstance(call.module,
                                                     (layers.BinaryConv, nn.BatchNorm)):
      calls.append(call.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_variables(model, IMAGENET)
  convs, norms = calls[0::2], calls[1::2]
  assert len(convs) == len(norms) == 53
  assert all(isinstance(m, layers.BinaryConv) for m in convs)
  for conv, norm in zip(convs, norms):
    assert isinstance(norm, nn.BatchNorm) and (norm.momentum, norm.epsilon) == (0.9, 1e-5)
    assert layers.module_path(norm) == layers.module_path(conv).replace('conv', 'bn')


def fully_binary_context(model, rules):
  """A context with every mask frozen (the deployed network), for the site table of `rules`."""
  found = sites.discover_sites(inspect.trace_model(model, CIFAR), rules)
  config = bctx.BinarizationConfig(method='stompp', schedule=schedule.ScheduleConfig(total_steps=1),
                                   sites=tuple(s.path for s in found))
  return bctx.BinarizationContext(step=jnp.zeros((), jnp.int32), key=jax.random.key(1),
                                  config=config, fully_binary=True)


def run_and_probe(model, ctx):
  """Runs a train step's forward pass; returns logits, state and {path: (x, kernel, x', kernel')}.

  x, kernel are what a layer passed to `binarized`; x', kernel' what it computed with.
  """
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *CIFAR)))
  x = jax.random.normal(jax.random.key(2), (4, *CIFAR))

  @jax.jit
  def forward(variables, x, ctx):
    probes = {}

    def record(next_fun, args, kwargs, call):
      out = next_fun(*args, **kwargs)
      if call.method_name == 'binarized':
        probes[layers.module_path(call.module)] = (*args[:2], *out)
      return out

    with nn.intercept_methods(record):
      logits, state = model.apply(variables, x, train=True, ctx=ctx,
                                  mutable=['batch_stats', 'binary_stats'])
    return logits, state, probes

  return forward(variables, x, ctx)


def is_plus_minus_one(a):
  return bool(jnp.all(jnp.abs(a) == 1))


@pytest.mark.parametrize('rules, binary', [
    (bctx.BinaryRules(include=('.*',), exclude=('^stem', '^classifier', 'shortcut')),
     TINY_CONVS[1:5]),
    (EVERYTHING, TINY_CONVS + ('classifier',)),
    (bctx.BinaryRules(include=('conv2$',)), ('stage1_block0/conv2', 'stage2_block0/conv2')),
])
def test_bnn_with_frozen_masks_binarizes_exactly_the_ruled_layers(rules, binary):
  model = create('tiny_resnet', mode='bnn')
  logits, state, probes = run_and_probe(model, fully_binary_context(model, rules))
  assert set(probes) == set(TINY_CONVS + ('classifier',))
  for path, (x, kernel, x_used, kernel_used) in probes.items():
    if path in binary:
      assert is_plus_minus_one(x_used) and is_plus_minus_one(kernel_used), path
      assert bool(jnp.all(jnp.sign(kernel) * kernel_used >= 0)), path
    else:
      assert bool(jnp.all(x_used == x) and jnp.all(kernel_used == kernel)), path
  assert set(state['binary_stats']) == {path.split('/')[0] for path in binary}
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_bnn_has_no_relu_and_bwn_keeps_it():
  rules = bctx.BinaryRules(exclude=('^stem', '^classifier', 'shortcut'))
  for mode, inputs_nonnegative in (('bnn', False), ('bwn', True)):
    model = create('tiny_resnet', mode=mode)
    _, _, probes = run_and_probe(model, fully_binary_context(model, rules))
    # The raw inputs of the first conv of each block: the stem's / the previous block's output.
    for path in ('stage1_block0/conv1', 'stage2_block0/conv1', 'classifier'):
      assert bool(jnp.all(probes[path][0] >= 0)) == inputs_nonnegative, (mode, path)
    x, kernel, x_used, kernel_used = probes['stage1_block0/conv2']
    assert bool(jnp.all(x >= 0)) == inputs_nonnegative  # The block's inner ReLU.
    assert is_plus_minus_one(kernel_used)
    assert is_plus_minus_one(x_used) == (mode == 'bnn')
    if mode == 'bwn':
      assert bool(jnp.all(x_used == x))


def test_fp_mode_ignores_the_context():
  model = create('tiny_resnet', mode='fp')
  ctx = fully_binary_context(model, EVERYTHING)
  logits, state, probes = run_and_probe(model, ctx)
  reference, _, _ = run_and_probe(model, None)
  np.testing.assert_array_equal(logits, reference)
  assert 'binary_stats' not in state
  for x, kernel, x_used, kernel_used in probes.values():
    assert bool(jnp.all(x_used == x) and jnp.all(kernel_used == kernel))


def test_site_order_follows_the_forward_pass():
  # block10 sorts before block2, and depthwise before expand: neither names nor the param tree
  # give this order, only the forward pass does.
  expected = []
  for i in range(17):
    expected += [f'block{i}/{conv}' for conv in ('expand', 'depthwise', 'project')
                 if i > 0 or conv != 'expand']
  expected.append('head_conv')
  assert site_paths('mobilenet_v2', models.binary_rules(model_config('mobilenet_v2'))) == expected
  assert site_paths('tiny_resnet', EVERYTHING) == list(TINY_CONVS) + ['classifier']


def test_a_rule_change_moves_layers_between_binary_and_float():
  default_rules = models.binary_rules(model_config('resnet20'))
  default_sites = site_paths('resnet20', default_rules)
  assert len(default_sites) == 18  # 9 blocks x 2 convs; stem, shortcuts, classifier stay float.
  everything = site_paths('resnet20', EVERYTHING)
  assert set(everything) - set(default_sites) == {
      'stem_conv', 'stage2_block0/shortcut_conv', 'stage3_block0/shortcut_conv', 'classifier'}
  no_stage1 = bctx.BinaryRules(exclude=default_rules.exclude + ('^stage1',))
  assert site_paths('resnet20', no_stage1) == [p for p in default_sites
                                               if not p.startswith('stage1')]
