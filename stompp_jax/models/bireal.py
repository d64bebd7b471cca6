"""Bi-Real Net (Liu et al. 2018): a real-valued shortcut around every binary conv.

    BiReal18    4 stages of 4 blocks of one 3x3 conv (64-128-256-512 channels), 16 binary convs

As in the authors' released Bi-Real-18 (`birealnet18`, layers [4, 4, 4, 4]): each block is
sign -> 3x3 conv -> BatchNorm, and its real-valued input is added to its output, so every binary
conv has its own shortcut and the real activations flow around it. The first block of stages 2-4
halves the resolution (stride-2 conv); its shortcut is 2x2 average pool (stride 2) -> 1x1 conv ->
BatchNorm. Stem and classifier as in ResNet-18 (resnet.py; 'imagenet' or 'cifar' stem); the
ImageNet stem has no ReLU in bnn mode, as in that code. What we do differently [ours]: plain sign
binarizers of this project (no per-channel kernel scaling, no ApproxSign gradient), and in modes
fp and bwn a ReLU after each addition (as the ResNets), where the paper's network is binary only.
The trainable parameter count equals ResNet-18's (11,689,512 with 1000 classes).

Module paths (binary-layer rules match them; the default rules keep stem, classifier and the
shortcut convs float, leaving the 16 block convs binary):

    stem_conv, stem_bn
    stage{s}_block{b}/conv, bn                       s = 1..4, b = 0..3
    stage{s}_block0/shortcut_conv, shortcut_bn       s = 2..4
    classifier
"""

import functools
from typing import Optional

import flax.linen as nn
import jax

from stompp_jax.binary import context as bctx
from stompp_jax.models import resnet


class BiRealBlock(resnet.Block):
  """conv -> BatchNorm plus the real shortcut: (B, H, W, C) -> (B, H / stride, W / stride, filters).

  `strides` is the conv's and the shortcut's average pool's.
  """

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    y = self.conv(features=self.filters, kernel_size=(3, 3), strides=self.strides,
                  name='conv')(x, ctx)
    y = self.norm(name='bn')(y)
    shortcut = x
    if x.shape[-1] != self.filters or tuple(self.strides) != (1, 1):
      shortcut = nn.avg_pool(x, self.strides, strides=self.strides)
      shortcut = self.conv(features=self.filters, kernel_size=(1, 1), name='shortcut_conv')(
          shortcut, ctx)
      shortcut = self.norm(name='shortcut_bn')(shortcut)
    return self.act(y + shortcut)


# resnet.ResNet with these blocks: the same stems, stages and classifier.
BiReal18 = functools.partial(resnet.ResNet, stage_sizes=(4, 4, 4, 4), block_cls=BiRealBlock)
