"""Helpers shared by test modules: the tiny in-process config, readers of a run's output, model
builders, hand counts of basic-block ResNets and a user-defined Flax model.

The command-line runs and checkpoint readers of the subprocess tests are in reliability_utils.py.
"""

import glob
import os
import pathlib
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from configs import default
from configs import tiny
from stompp_jax import metrics as metrics_lib
from stompp_jax import models
from stompp_jax import sites
from stompp_jax.binary import context as bctx
from stompp_jax.models import inspect
from stompp_jax.models import summary as summary_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(method='stompp', **train_overrides):
  """configs/tiny.py for `method` (tiny_resnet on synthetic 16x16x3 images of 4 classes, batch
  32, 12 steps); `train_overrides` set fields of config.train."""
  config = tiny.get_config(method)
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


def compile_cache() -> str:
  """The suite's persistent compilation cache (conftest.py), for the commands a test starts."""
  return jax.config.jax_compilation_cache_dir or ''


def rows(workdir, split):
  """The metrics.jsonl rows of `workdir` whose split is `split` ('train' or 'eval')."""
  return [r for r in metrics_lib.read_metrics(str(workdir)) if r['split'] == split]


def read_events(logdir):
  """Every Event of every TFRecord event file under `logdir`, file by file in name order."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


CIFAR = (32, 32, 3)
IMAGENET = (224, 224, 3)
EVERYTHING = bctx.BinaryRules(include=('.*',), exclude=())


def model_config(name, **fields):
  config = default.get_config().model
  config.name = name
  for field, value in fields.items():
    config[field] = value
  return config


def create(name, image_shape=CIFAR, num_classes=10, **fields):
  return models.create_model(model_config(name, **fields), num_classes=num_classes,
                             image_shape=image_shape)


def abstract_variables(model, image_shape):
  return jax.eval_shape(model.init, jax.random.key(0), inspect.sample_input(image_shape))


def num_params(variables):
  return sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


def site_paths(name, rules):
  model = create(name)
  found = sites.discover_sites(inspect.trace_model(model, CIFAR), rules)
  return ['/'.join(s.path) for s in found]  # As the site table prints them.


def summarize(name, image_shape, num_classes, mode='bnn', rules=None):
  config = default.get_config().model
  config.name, config.mode = name, mode
  return summary_lib.summarize(config, num_classes=num_classes, image_shape=image_shape,
                               rules=rules or models.binary_rules(config))


def conv(k, cin, cout, out_size):
  """(params, MACs) of a bias-free k x k conv producing out_size x out_size x cout."""
  return k * k * cin * cout, out_size * out_size * k * k * cin * cout


def basic_resnet_by_hand(stem, stages, blocks_per_stage, num_classes):
  """Hand totals of a basic-block ResNet in bnn mode with the default rules.

  Args:
    stem: (kernel size, channels, output size) of the stem conv (3 input channels).
    stages: (in channels, channels, output size) per stage.
    blocks_per_stage: basic blocks (2 binary 3x3 convs each) per stage.
    num_classes: outputs of the classifier (with bias).
  """
  kernel, stem_channels, stem_size = stem
  binary, floats, bn_channels = [], [conv(kernel, 3, stem_channels, stem_size)], stem_channels
  for cin, cout, size in stages:
    binary += [conv(3, cin, cout, size)] + [conv(3, cout, cout, size)] * (2 * blocks_per_stage - 1)
    bn_channels += 2 * blocks_per_stage * cout
    if cin != cout:
      floats.append(conv(1, cin, cout, size))
      bn_channels += cout
  features = stages[-1][1]
  return dict(
      binary_params=sum(p for p, _ in binary),
      float_params=sum(p for p, _ in floats) + features * num_classes + num_classes
      + 2 * bn_channels,
      float_stats=2 * bn_channels,
      binary_macs=sum(m for _, m in binary),
      float_macs=sum(m for _, m in floats) + features * num_classes)


# ImageNet ResNet-18: 7x7/2 stem to 112 px, pool to 56, 4 stages of 2 basic blocks.
RESNET18 = dict(stem=(7, 64, 112),
                stages=((64, 64, 56), (64, 128, 28), (128, 256, 14), (256, 512, 7)),
                blocks_per_stage=2, num_classes=1000)


def sign(x):
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


class VGG(nn.Module):
  """conv0 (float) -> conv1 -> pool -> conv2 -> pool -> dense -> head; BatchNorm after each conv.

  `hand_signs` names the layers whose input this model signs itself: with kernels signed by
  hand too, that is the fully binary network written out (the reference of the tests).
  """

  num_classes: int = 4
  hand_signs: tuple[str, ...] = ()

  def _input(self, name, x):
    return sign(x) if name in self.hand_signs else x

  @nn.compact
  def __call__(self, x, train=False):
    for i, features in enumerate((8, 8, 16)):
      x = nn.Conv(features, (3, 3), use_bias=False, name=f'conv{i}')(self._input(f'conv{i}', x))
      x = nn.BatchNorm(use_running_average=not train, name=f'bn{i}')(x)
      if i:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(32, name='dense')(self._input('dense', x))
    x = nn.BatchNorm(use_running_average=not train, name='bn_dense')(x)
    return nn.Dense(self.num_classes, name='head')(self._input('head', x))


def own_config(method='stompp', mode='bnn', **train_overrides):
  """tiny_config with every layer of VGG binary but conv0 and head."""
  config = tiny_config(method, **train_overrides)
  config.model.mode = mode
  config.model.binary_include = ('.*',)
  config.model.binary_exclude = ('^conv0$', '^head$')
  return config
