"""Model summary: totals against hand counts, precision per mode. The command:
test_documented_commands.py::test_the_docs_summary_command_prints_resnet50."""

import pytest

from configs import default
from stompp_jax.data import pipeline

from helpers import (  # pylint: disable=g-bad-import-order
    EVERYTHING, RESNET18, basic_resnet_by_hand, summarize)

# CIFAR ResNet-20: 3x3 stem, 3 stages of 3 basic blocks, 16/32/64 channels at 32/16/8 pixels.
RESNET20 = dict(stem=(3, 16, 32), stages=((16, 16, 32), (16, 32, 16), (32, 64, 8)),
                blocks_per_stage=3, num_classes=10)


@pytest.mark.parametrize('name, image_shape, architecture, published_params', [
    ('resnet20', (32, 32, 3), RESNET20, 272_474),
    ('resnet18', (224, 224, 3), RESNET18, 11_689_512),
])
def test_bnn_totals_equal_hand_counts(name, image_shape, architecture, published_params):
  s = summarize(name, image_shape, architecture['num_classes'])
  expected = basic_resnet_by_hand(**architecture)
  for field, value in expected.items():
    assert s.total(field) == value, field
  assert s.total('binary_weight_macs') == 0
  assert s.trainable_params == published_params
  stored_bits = (expected['binary_params']
                 + 32 * (expected['float_params'] + expected['float_stats']))
  assert s.memory_bytes == stored_bits / 8
  assert s.float32_memory_bytes == 4 * (published_params + expected['float_stats'])
  assert s.compression == pytest.approx(s.float32_memory_bytes / s.memory_bytes)


def test_resnet18_macs_match_the_published_1_8_gmacs():
  assert summarize('resnet18', (224, 224, 3), 1000).macs == pytest.approx(1.82e9, rel=0.01)


def test_mode_decides_the_precision_of_the_ruled_layers():
  bnn = summarize('resnet20', (32, 32, 3), 10, mode='bnn')
  bwn = summarize('resnet20', (32, 32, 3), 10, mode='bwn')
  fp = summarize('resnet20', (32, 32, 3), 10, mode='fp')
  assert bwn.total('binary_params') == bnn.total('binary_params') > 0
  assert bwn.total('binary_weight_macs') == bnn.total('binary_macs') > 0
  assert bwn.total('binary_macs') == 0
  assert fp.total('binary_params') == fp.total('binary_macs') == fp.total('binary_weight_macs') == 0
  assert fp.macs == bwn.macs == bnn.macs
  assert fp.compression == 1.0


def test_rules_decide_which_layers_count_as_binary():
  s = summarize('resnet20', (32, 32, 3), 10, rules=EVERYTHING)
  assert s.total('float_macs') == 0
  assert all(r.precision == 'binary' for r in s.rows if r.kind != 'batch_norm')
  # Left in float: BatchNorm scale and bias (as many as its statistics) and the classifier bias.
  assert s.total('float_params') == s.total('float_stats') + 10
  assert s.total('binary_params') == 272_474 - s.total('float_params')


def test_rows_are_in_forward_order_with_output_shapes():
  rows = summarize('resnet18', (224, 224, 3), 1000).rows
  assert [r.path for r in rows[:3]] == ['stem_conv', 'stem_bn', 'stage1_block0/conv1']
  assert rows[0].output_shape == (112, 112, 64)
  assert rows[2].output_shape == (56, 56, 64)
  assert (rows[-1].path, rows[-1].output_shape) == ('classifier', (1000,))


def test_input_shape_reads_no_data():
  data = default.get_config().data
  data.name, data.dir = 'imagenet2012', '/nonexistent'
  assert pipeline.input_shape(data) == (1000, (224, 224, 3))
  data.name, data.image_size, data.augment = 'cifar100', 40, 'imagenet'
  assert pipeline.input_shape(data) == (100, (40, 40, 3))
  data.name = 'mnist'
  with pytest.raises(ValueError, match='imagenet2012'):
    pipeline.input_shape(data)
