"""Bi-Real-18: parameter count, a real shortcut around every binary conv, site order, summary."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from stompp_jax import models
from stompp_jax.models import bireal

import helpers  # pylint: disable=g-bad-import-order

BLOCKS = [f'stage{s}_block{b}' for s in range(1, 5) for b in range(4)]


def test_parameter_count_equals_resnet18():
  # 16 binary 3x3 convs: 4 x 64*64*9 + (64*128 + 3*128*128 + 128*256 + 3*256*256 + 256*512
  # + 3*512*512) * 9 = 10,985,472; float: stem 9,408, shortcuts 172,032, classifier 513,000,
  # BatchNorm scale and bias 9,600: 11,689,512 in all, ResNet-18's count (Liu et al. 2018).
  model = helpers.create('bireal18', helpers.IMAGENET, 1000, mode='fp')
  assert helpers.num_params(helpers.abstract_variables(model, helpers.IMAGENET)) == 11_689_512


def test_sites_are_the_16_block_convs_in_forward_order():
  rules = models.binary_rules(helpers.model_config('bireal18'))
  assert helpers.site_paths('bireal18', rules) == [f'{b}/conv' for b in BLOCKS]
  everything = helpers.site_paths('bireal18', helpers.EVERYTHING)
  assert everything[:3] == ['stem_conv', 'stage1_block0/conv', 'stage1_block1/conv']
  assert everything[5:7] == ['stage2_block0/conv', 'stage2_block0/shortcut_conv']
  assert everything[-1] == 'classifier' and len(everything) == 16 + 3 + 2


def test_summary_totals_equal_hand_counts():
  # Per stage, Bi-Real-18 has the 3x3 convs (one cin -> cout, three cout -> cout), the 1x1
  # shortcut at the output size and the BatchNorm channels of ResNet-18's two basic blocks, so
  # the hand count of ResNet-18 applies term by term.
  s = helpers.summarize('bireal18', helpers.IMAGENET, 1000)
  for field, value in helpers.basic_resnet_by_hand(**helpers.RESNET18).items():
    assert s.total(field) == value, field
  assert s.total('binary_params') == 10_985_472
  assert [r.path for r in s.rows if r.precision == 'binary'] == [f'{b}/conv' for b in BLOCKS]


def test_every_block_adds_its_real_input_around_the_binary_conv():
  model = helpers.create('bireal18', mode='bnn')
  images = jax.random.normal(jax.random.key(0), (2, *helpers.CIFAR))
  variables = model.init(jax.random.key(1), images)
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  for block in BLOCKS:  # Silence every block's conv branch: only the shortcuts remain.
    flat[f'{block}/bn/scale'] = jnp.zeros_like(flat[f'{block}/bn/scale'])
    flat[f'{block}/bn/bias'] = jnp.zeros_like(flat[f'{block}/bn/bias'])
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  seen = {}

  def record(next_fun, args, kwargs, call):
    out = next_fun(*args, **kwargs)
    if isinstance(call.module, bireal.BiRealBlock) and call.method_name == '__call__':
      seen['/'.join(call.module.path)] = (args[0], out)
    return out

  with nn.intercept_methods(record):
    model.apply({**variables, 'params': params}, images)
  for block in BLOCKS:
    x, out = seen[block]
    if not block.endswith('block0') or block == 'stage1_block0':
      np.testing.assert_array_equal(out, x, err_msg=block)
    else:
      assert out.shape[1] == x.shape[1] // 2 and out.shape[-1] == 2 * x.shape[-1], block
