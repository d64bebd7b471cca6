"""MobileNetV2 (Sandler et al. 2018) for fp, binary-weight (BWN) and binary (BNN) training.

The ImageNet network is torchvision's `mobilenet_v2` (3,504,872 parameters at width 1.0 and
1000 classes) without the dropout before the classifier [ours]. Stems: 'imagenet' = 3x3
stride-2 conv (output stride 32); 'cifar' = 3x3 stride-1 conv and stride 1 in the first
24-channel block too (output stride 8; 4x4 features for 32x32 images), the usual CIFAR variant.

Module paths (binary-layer rules match them, see configs/default.py):

    stem_conv, stem_bn
    block{i}/expand, expand_bn       i = 0..16; block0 (expansion 1) has no expand conv
    block{i}/depthwise, depthwise_bn
    block{i}/project, project_bn
    head_conv, head_bn               the final 1x1 conv to 1280 channels
    classifier

The default rules (stem, classifier and shortcuts stay float) make every expand, depthwise and
project conv binary, and the head conv too: it is an ordinary 1x1 conv, not the classifier
[ours; the papers do not say]. Exclude it with the rule '^head'. MobileNetV2 has no projection
shortcuts: its residual additions are identities.

Modes as in resnet.py: fp ignores the context; bwn binarizes kernels and keeps ReLU6; bnn also
binarizes the inputs of binary convs and has no ReLU6 anywhere (stem, blocks, head) [ours],
so the binarizers are the nonlinearities; the projection is linear in every mode.
BatchNorm after every conv (momentum 0.9, epsilon 1e-5, float32 statistics).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax.binary import context as bctx
from stompp_jax.models import resnet

ModuleDef = Any

# (expansion t, channels c, blocks n, stride s of the first block), Sandler et al. 2018, Table 2.
BLOCK_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1))


def round_channels(channels: float, divisor: int = 8) -> int:
  """Nearest multiple of `divisor`, never more than 10% below `channels` (torchvision's rule)."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
  """1x1 expand -> 3x3 depthwise (strided) -> 1x1 linear project (+ x when the shapes match).

  (B, H, W, C) -> (B, H / stride, W / stride, features).
  """

  features: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    hidden = int(round(x.shape[-1] * self.expansion))
    y = x
    if self.expansion != 1:
      y = self.conv(features=hidden, kernel_size=(1, 1), name='expand')(y, ctx)
      y = self.act(self.norm(name='expand_bn')(y))
    y = self.conv(features=hidden, kernel_size=(3, 3), strides=self.strides,
                  feature_group_count=hidden, name='depthwise')(y, ctx)
    y = self.act(self.norm(name='depthwise_bn')(y))
    y = self.conv(features=self.features, kernel_size=(1, 1), name='project')(y, ctx)
    y = self.norm(name='project_bn')(y)
    if tuple(self.strides) == (1, 1) and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 on NHWC images.

  Attributes:
    num_classes: logits per example.
    width_multiplier: scales every channel count (rounded to multiples of 8); the head
      keeps at least 1280 channels.
    dtype: compute dtype; params and BatchNorm statistics stay float32.
    stem: 'imagenet' or 'cifar' (see the module docstring).
    mode: 'fp', 'bwn' or 'bnn'.
  """

  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  stem: str = 'imagenet'
  mode: str = 'fp'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               ctx: Optional[bctx.BinarizationContext] = None) -> jax.Array:
    """x: float (B, H, W, C) -> float32 logits (B, num_classes); `ctx` as for ResNet."""
    if self.mode == 'fp':
      ctx = None  # Mode fp runs every layer in full precision whatever `ctx` is.
    conv, norm, act = resnet.layer_factories(self.mode, train, self.dtype, nn.relu6)
    cifar = self.stem == 'cifar'
    x = conv(features=round_channels(32 * self.width_multiplier), kernel_size=(3, 3),
             strides=(1, 1) if cifar else (2, 2), name='stem_conv')(x, ctx)
    x = act(norm(name='stem_bn')(x))
    i = 0
    for stage, (expansion, channels, num_blocks, stride) in enumerate(BLOCK_SETTINGS):
      if cifar and stage == 1:
        stride = 1
      for b in range(num_blocks):
        strides = (stride, stride) if b == 0 else (1, 1)
        x = InvertedResidual(round_channels(channels * self.width_multiplier), expansion, conv=conv,
                             norm=norm, act=act, strides=strides, name=f'block{i}')(x, ctx)
        i += 1
    x = conv(features=round_channels(1280 * max(1.0, self.width_multiplier)), kernel_size=(1, 1),
             name='head_conv')(x, ctx)
    x = act(norm(name='head_bn')(x))
    return resnet.classify(x, self.num_classes, self.mode, self.dtype, ctx)

