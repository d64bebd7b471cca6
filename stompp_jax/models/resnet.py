"""ResNets (He et al. 2016) for fp, binary-weight (BWN) and binary (BNN) training.

One `ResNet` class with basic and bottleneck blocks; the variants are `functools.partial`s:

    ResNet18 / ResNet34 / ResNet50     64-256-... channels, ImageNet or CIFAR stem
    ResNet20 / 32 / 44 / 56 / 110      CIFAR ResNets: 3 stages of 16/32/64 channels
    TinyResNet                         2 stages of 8/16 channels, one basic block each (tests)

Stems: 'imagenet' = 7x7 stride-2 conv + 3x3 stride-2 max-pool (output stride 32);
'cifar' = 3x3 stride-1 conv, no pool (output stride 8 for 4 stages, 4 for 3 stages).
Every stage after the first halves the resolution with stride 2 on its first block
(on the 3x3 conv of a bottleneck, as torchvision's "v1.5"); a block whose shape changes
gets a 1x1 projection shortcut with BatchNorm (He et al. 2016, option B; also in the CIFAR ResNets).

Module paths (binary-layer rules match them, see configs/default.py):

    stem_conv, stem_bn
    stage{s}_block{b}/conv1, bn1, conv2, bn2[, conv3, bn3]      s = 1.., b = 0..
    stage{s}_block{b}/shortcut_conv, shortcut_bn                 only where the shape changes
    classifier

Modes (docs/method.md, "What is binarized"); the rules decide at call time which layers are binary:
  fp:  the plain network; the context is not passed to the layers, so nothing is binarized.
  bwn: binary kernels, real activations; every ReLU kept.
  bnn: binary kernels and binary inputs of every binary conv. [ours] The binarizer is the
       nonlinearity, so the network has no ReLU: not in the blocks (nor after the residual
       addition) and not in the stem (after a ReLU every input would be >= 0 and the sign
       a constant +1). BatchNorm stays after every conv; plain sign, no scaling factors;
       residual additions unchanged. 'SAME' padding pads the +-1 input of a binary conv with
       zeros, as larq's default.
       The papers do not state the block topology; `bnn_shortcut` picks one of two readings:
         real       conv1 binarizes its own input; the shortcut (identity or projection)
                    carries the real-valued block input, so gradient always reaches upstream
                    layers around every binarizer (the block before issue 15).
         binarized  the block input is binarized once, by conv1's site (its mask, its
                    schedule), and that value feeds conv1 and the shortcut; a projection
                    shortcut sees the binarized input and does not binarize it again. A fully
                    committed input site then passes no gradient upstream (STE-free StoMPP):
                    the blockade the papers' reverse-order and STE depth arguments rest on.
       Parameters, module paths and the site table are the same in both readings.
BatchNorm: momentum 0.9, epsilon 1e-5, scale 1 and bias 0 at init, float32 statistics.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax import layers
from stompp_jax.binary import context as bctx

ModuleDef = Any
MODES = ('fp', 'bwn', 'bnn')
BNN_SHORTCUTS = ('real', 'binarized')
STEMS = ('cifar', 'imagenet')


def layer_factories(mode: str, train: bool, dtype: Any,
                    activation: Callable) -> tuple[ModuleDef, ModuleDef, Callable]:
  """(conv, norm, act) shared by the models: the layer types and the nonlinearity of `mode`.

  In bnn mode the nonlinearity is the identity (the binarizers take its place) [ours].
  """
  conv = functools.partial(layers.BinaryConv, binarize_input=(mode == 'bnn'), dtype=dtype)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype)
  act = (lambda x: x) if mode == 'bnn' else activation
  return conv, norm, act


def classify(x: jax.Array, num_classes: int, mode: str, dtype: Any,
             ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
  """Global average pool and dense `classifier`: (B, H, W, C) -> float32 logits (B, num_classes).

  Called inside a model's compact `__call__`, so the classifier belongs to that model.
  """
  x = jnp.mean(x, axis=(1, 2))
  x = layers.BinaryDense(features=num_classes, binarize_input=(mode == 'bnn'), dtype=dtype,
                         name='classifier')(x, ctx)
  return x.astype(jnp.float32)


def shortcut(x: jax.Array, features: int, strides: tuple[int, int], conv: ModuleDef,
             norm: ModuleDef, ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
  """Identity, or when the shape changes a 1x1 projection + BatchNorm (shortcut_conv, shortcut_bn).

  Called inside a block's compact `__call__`, so the submodules belong to that block.
  """
  if x.shape[-1] == features and tuple(strides) == (1, 1):
    return x
  x = conv(features=features, kernel_size=(1, 1), strides=strides, name='shortcut_conv')(x, ctx)
  return norm(name='shortcut_bn')(x)


class Block(nn.Module):
  """Attributes of the residual blocks.

  Attributes:
    filters: channels of the block's convs (the last one has 4x as many in a bottleneck).
    conv, norm, act: from `layer_factories`.
    strides: of the block's strided 3x3 conv and of its projection shortcut.
    bnn_shortcut: 'real' (conv1 binarizes its own input; the shortcut carries the real input)
      or 'binarized' (the input is binarized once by conv1's site and feeds conv1 and the
      shortcut). See the module docstring.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)
  bnn_shortcut: str = 'real'

  def conv1(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext],
            **conv_kwargs) -> tuple[jax.Array, jax.Array]:
    """Applies the block's first conv ('conv1') to x; returns (its output, the shortcut input)."""
    if self.bnn_shortcut == 'real':
      return self.conv(name='conv1', **conv_kwargs)(x, ctx), x
    conv1 = self.conv(name='conv1', binarize_input=False, **conv_kwargs)
    x = conv1.binarize_own_input(x, ctx)
    return conv1(x, ctx), x

  def add_shortcut(self, y: jax.Array, x: jax.Array,
                   ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    """act(y + shortcut(x)); a binarized shortcut input is not binarized again."""
    conv = self.conv
    if self.bnn_shortcut == 'binarized':
      conv = functools.partial(conv, binarize_input=False)
    return self.act(y + shortcut(x, y.shape[-1], self.strides, conv, self.norm, ctx))


class BasicBlock(Block):
  """Two 3x3 convs: (B, H, W, C) -> (B, H / stride, W / stride, filters)."""

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    y, x = self.conv1(x, ctx, features=self.filters, kernel_size=(3, 3), strides=self.strides)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(features=self.filters, kernel_size=(3, 3), name='conv2')(y, ctx)
    y = self.norm(name='bn2')(y)
    return self.add_shortcut(y, x, ctx)


class BottleneckBlock(Block):
  """1x1 -> 3x3 (strided) -> 1x1 convs: (B, H, W, C) -> (B, H / stride, W / stride, 4 * filters)."""

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    y, x = self.conv1(x, ctx, features=self.filters, kernel_size=(1, 1))
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(features=self.filters, kernel_size=(3, 3), strides=self.strides,
                  name='conv2')(y, ctx)
    y = self.act(self.norm(name='bn2')(y))
    y = self.conv(features=4 * self.filters, kernel_size=(1, 1), name='conv3')(y, ctx)
    y = self.norm(name='bn3')(y)
    return self.add_shortcut(y, x, ctx)


class ResNet(nn.Module):
  """ResNet on NHWC images.

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or BottleneckBlock.
    num_classes: logits per example.
    num_filters: channels of the stem and of the first stage (doubling per stage).
    stem: 'imagenet' or 'cifar' (see the module docstring).
    mode: 'fp', 'bwn' or 'bnn' (see the module docstring).
    bnn_shortcut: one of BNN_SHORTCUTS, the block topology in mode bnn (module docstring);
      ignored in fp and bwn, whose block inputs are never binarized.
    dtype: compute dtype; params and BatchNorm statistics stay float32.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  stem: str = 'imagenet'
  mode: str = 'fp'
  bnn_shortcut: str = 'real'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               ctx: Optional[bctx.BinarizationContext] = None) -> jax.Array:
    """x: float (B, H, W, C) -> float32 logits (B, num_classes).

    `ctx=None` runs every layer in full precision; so does mode 'fp' whatever `ctx` is.
    """
    if self.mode == 'fp':
      ctx = None
    bnn_shortcut = self.bnn_shortcut if self.mode == 'bnn' else 'real'
    conv, norm, act = layer_factories(self.mode, train, self.dtype, nn.relu)
    if self.stem == 'imagenet':
      x = conv(features=self.num_filters, kernel_size=(7, 7), strides=(2, 2),
               padding=[(3, 3), (3, 3)], name='stem_conv')(x, ctx)
      x = act(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = conv(features=self.num_filters, kernel_size=(3, 3), name='stem_conv')(x, ctx)
      x = act(norm(name='stem_bn')(x))
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        strides = (2, 2) if s > 0 and b == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**s, conv=conv, norm=norm, act=act,
                           strides=strides, bnn_shortcut=bnn_shortcut,
                           name=f'stage{s + 1}_block{b}')(x, ctx)
    return classify(x, self.num_classes, self.mode, self.dtype, ctx)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)

_CifarResNet = functools.partial(ResNet, block_cls=BasicBlock, num_filters=16, stem='cifar')
ResNet20 = functools.partial(_CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(_CifarResNet, stage_sizes=(5, 5, 5))
ResNet44 = functools.partial(_CifarResNet, stage_sizes=(7, 7, 7))
ResNet56 = functools.partial(_CifarResNet, stage_sizes=(9, 9, 9))
ResNet110 = functools.partial(_CifarResNet, stage_sizes=(18, 18, 18))

TinyResNet = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8,
                               stem='cifar')
