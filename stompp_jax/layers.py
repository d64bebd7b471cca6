"""Flax Linen layers that binarize their kernel (and, for BNNs, their input).

Every conv and dense layer of the models is a `BinaryConv` / `BinaryDense`; whether it is binary
is decided at call time by the rules in the context (regexes on the module path), so the model
code is the same for fp, BWN and BNN and the parameter tree matches `nn.Conv` / `nn.Dense`.

Call with `ctx=None` (init, or a plain float network) to run the layer in full precision.
A binary layer sows its scheduled kernel frozen fraction into the 'binary_stats' collection.
"""

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax.binary import context as bctx

Dtype = Any


def module_path(module: nn.Module) -> str:
  """'/'-joined path of a bound module, e.g. 'stage2_block1/conv1'."""
  return '/'.join(module.path)


class _BinaryLayer(nn.Module):
  """Shared call logic: binarize kernel and input when this layer is a binary site.

  Its fields are keyword-only, so `BinaryConv(64, (3, 3))` means features, kernel_size as in
  `nn.Conv`.
  """

  _: dataclasses.KW_ONLY
  binarize_input: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def is_binary(self, ctx: Optional[bctx.BinarizationContext]) -> bool:
    return (ctx is not None and ctx.config.method != 'fp'
            and ctx.config.rules.is_binary(module_path(self)))

  def binarized(self, x: jax.Array, kernel: jax.Array,
                ctx: Optional[bctx.BinarizationContext]) -> tuple[jax.Array, jax.Array]:
    """Returns (input, kernel) as the layer computes with them, in the compute dtype."""
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if not self.is_binary(ctx):
      return x, kernel
    site = ctx.config.site_index(module_path(self))
    self.sow('binary_stats', 'frozen_fraction', bctx.site_fraction(ctx, site),
             init_fn=lambda: (), reduce_fn=lambda _, v: v)
    kernel = bctx.binarize_site_tensor(kernel, ctx, site, 'kernel')
    if self.binarize_input:
      x = bctx.binarize_site_tensor(x, ctx, site, 'input')
    return x, kernel

  def binarize_own_input(self, x: jax.Array,
                         ctx: Optional[bctx.BinarizationContext]) -> jax.Array:
    """`x` as this layer would binarize its input (unchanged when it does not), in the compute
    dtype. Lets a block binarize its input once with this layer's site and feed that value to
    this layer (built with binarize_input=False) and to its shortcut (resnet.py, bnn_shortcut).
    """
    x = x.astype(self.dtype or x.dtype)
    if not self.is_binary(ctx):
      return x
    return bctx.binarize_site_tensor(x, ctx, ctx.config.site_index(module_path(self)), 'input')


class BinaryConv(_BinaryLayer):
  """2D convolution, NHWC, kernel (kh, kw, in / groups, features) as in `nn.Conv`.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or explicit pairs.
    feature_group_count: groups (in channels for a depthwise conv).
    use_bias: add a bias (off for convs followed by BatchNorm).
    binarize_input: binarize the input too when binary (BNN).
  """

  features: int = 0
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: Any = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext] = None) -> jax.Array:
    """x: (batch, height, width, in_channels) -> (batch, height', width', features)."""
    in_features = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, in_features // self.feature_group_count, self.features),
                        self.param_dtype)
    x, kernel = self.binarized(x, kernel, ctx)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=tuple(self.strides), padding=self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.feature_group_count)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
    return y


class BinaryDense(_BinaryLayer):
  """Dense layer, kernel (in_features, features) as in `nn.Dense`."""

  features: int = 0
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[bctx.BinarizationContext] = None) -> jax.Array:
    """x: (batch, in_features) -> (batch, features)."""
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    x, kernel = self.binarized(x, kernel, ctx)
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
    return y
