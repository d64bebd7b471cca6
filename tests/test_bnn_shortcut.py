"""model.bnn_shortcut: the two readings of the BNN residual block (models/resnet.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from stompp_jax import layers
from stompp_jax import models
from stompp_jax import sites
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule
from stompp_jax.models import inspect
from stompp_jax.models import resnet

IMAGE = (8, 8, 3)
DEFAULT_RULES = bctx.BinaryRules(exclude=('^stem', '^classifier', 'shortcut'))
EVERYTHING = bctx.BinaryRules()
TinyBottleneck = functools.partial(resnet.ResNet, stage_sizes=(1, 1),
                                   block_cls=resnet.BottleneckBlock, num_filters=4, stem='cifar')


def make(block, bnn_shortcut, mode='bnn'):
  if block == 'basic':
    return resnet.TinyResNet(num_classes=3, mode=mode, bnn_shortcut=bnn_shortcut)
  return TinyBottleneck(num_classes=3, mode=mode, bnn_shortcut=bnn_shortcut)


def site_list(model, rules):
  return sites.discover_sites(inspect.trace_model(model, IMAGE), rules)


def context(model, rules, step=0, total_steps=1, fully_binary=True, method='stompp'):
  config = bctx.BinarizationConfig(
      method=method, schedule=schedule.ScheduleConfig(total_steps=total_steps),
      sites=tuple(s.path for s in site_list(model, rules)))
  return bctx.BinarizationContext(step=jnp.asarray(step, jnp.int32), key=jax.random.key(1),
                                  config=config, fully_binary=fully_binary)


def param_grads(model, ctx):
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
  x = jax.random.normal(jax.random.key(2), (4, *IMAGE))
  labels = jnp.arange(4) % 3

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True, ctx=ctx,
                            mutable=['batch_stats', 'binary_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  return jax.grad(loss)(variables['params'])


def norm(tree):
  return float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
def test_a_committed_input_site_blocks_upstream_gradient_only_when_binarized(block):
  # Every site fully committed (the deployed network, STE-free StoMPP): in 'binarized' the stem
  # feeds the network only through stage1_block0's binarized input, so it gets no gradient.
  for bnn_shortcut, blocked in (('real', False), ('binarized', True)):
    model = make(block, bnn_shortcut)
    grads = param_grads(model, context(model, DEFAULT_RULES))
    assert (norm(grads['stem_conv']) + norm(grads['stem_bn']) == 0.0) == blocked, bnn_shortcut
    assert norm(grads['classifier']) > 0 and norm(grads['stage2_block0']['shortcut_bn']) > 0


def test_an_uncommitted_input_site_passes_gradient_in_both_readings():
  for bnn_shortcut in resnet.BNN_SHORTCUTS:
    model = make('basic', bnn_shortcut)
    grads = param_grads(model, context(model, DEFAULT_RULES, step=0, total_steps=100,
                                       fully_binary=False))
    assert norm(grads['stem_conv']) > 0, bnn_shortcut


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
@pytest.mark.parametrize('rules', [DEFAULT_RULES, EVERYTHING])
def test_params_and_sites_are_the_same_in_both_readings(block, rules):
  real, binarized = make(block, 'real'), make(block, 'binarized')
  shapes = [jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0),
                                                           inspect.sample_input(IMAGE)))
            for m in (real, binarized)]
  assert shapes[0] == shapes[1]
  assert site_list(real, rules) == site_list(binarized, rules)


def test_binarized_shortcut_sees_conv1s_binarized_input_and_does_not_binarize_again():
  model = make('basic', 'binarized')
  ctx = context(model, EVERYTHING)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
  seen = {}

  def record(next_fun, args, kwargs, call):
    out = next_fun(*args, **kwargs)
    if call.method_name == 'binarized':
      seen[layers.module_path(call.module)] = (args[0], out[0])
    return out

  with nn.intercept_methods(record):
    model.apply(variables, jax.random.normal(jax.random.key(2), (2, *IMAGE)), train=True,
                ctx=ctx, mutable=['batch_stats', 'binary_stats'])
  conv1_in, conv1_used = seen['stage2_block0/conv1']
  shortcut_in, shortcut_used = seen['stage2_block0/shortcut_conv']
  assert bool(jnp.all(jnp.abs(conv1_in) == 1))  # Binarized by the block, before conv1.
  np.testing.assert_array_equal(conv1_used, conv1_in)
  np.testing.assert_array_equal(shortcut_in, conv1_in)
  np.testing.assert_array_equal(shortcut_used, shortcut_in)


def test_fp_and_bwn_ignore_the_reading():
  x = jax.random.normal(jax.random.key(2), (2, *IMAGE))
  for mode in ('fp', 'bwn'):
    outs = []
    for bnn_shortcut in resnet.BNN_SHORTCUTS:
      model = make('basic', bnn_shortcut, mode=mode)
      variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
      outs.append(model.apply(variables, x, ctx=context(model, DEFAULT_RULES)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_config_field_reaches_the_model_and_mobilenet_refuses_binarized():
  config = default.get_config().model
  assert config.bnn_shortcut == 'real'
  config.bnn_shortcut = 'binarized'
  assert models.create_model(config, num_classes=10, image_shape=(32, 32, 3)).bnn_shortcut == 'binarized'
  config.name = 'mobilenet_v2'
  with pytest.raises(ValueError, match='bnn_shortcut=real with mobilenet_v2'):
    models.check_model_config(config)
  config.bnn_shortcut = 'both'
  with pytest.raises(ValueError, match='Unknown model.bnn_shortcut'):
    models.check_model_config(config)
