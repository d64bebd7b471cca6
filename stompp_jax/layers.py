"""How a conv or dense layer becomes a binary site: the zoo's layers and any Flax model by rules.

Two ways in, one binarization (`binarize_site_tensor` of binary/context.py on the kernel and, for
BNNs, the input, with the site's masks from the step's `BinarizationContext`):

- The zoo's models are built from `BinaryConv` / `BinaryDense`, which get the context as a call
  argument and binarize inside. Whether a layer is binary is decided at call time by the site
  table in the context (`ctx.config.site_index(self.path)`, read from the model's trace), so the
  model code is the same for fp, BWN and BNN and the parameter tree matches `nn.Conv` /
  `nn.Dense`. Call with `ctx=None` (init, or a plain float network) to run the layer in full
  precision.
- `ByRules(module, binarize_input)` wraps any Linen model built from plain `nn.Conv` /
  `nn.Dense` (and `nn.BatchNorm`), called as `module(x, train=...)`, without changing its code:
  its `apply(..., ctx=ctx)` maps the variables (each site's kernel in the params tree is replaced
  by its binarization; gradients reach the latent kernel through the binarizer's VJP) and
  intercepts the `__call__` of every site (`nn.intercept_methods`) to binarize its input.

Either way a binary layer sows its scheduled kernel frozen fraction into the 'binary_stats'
collection, under its module path.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax.binary import committed
from stompp_jax.binary import context as bctx

Dtype = Any


def module_path(module: nn.Module) -> str:
  """'/'-joined path of a bound module, e.g. 'stage2_block1/conv1'."""
  return '/'.join(module.path)


def sow_frozen_fraction(module: nn.Module, ctx: bctx.BinarizationContext, site: int) -> None:
  """Records the site's scheduled frozen fraction in module's 'binary_stats' (if mutable)."""
  module.sow('binary_stats', 'frozen_fraction', bctx.site_fraction(ctx, site),
             init_fn=lambda: (), reduce_fn=lambda _, v: v)


class _BinaryLayer(nn.Module):
  """Shared call logic: binarize kernel and input when this layer is a binary site.

  Its fields are keyword-only, so `BinaryConv(64, (3, 3))` means features, kernel_size as in
  `nn.Conv`.
  """

  _: dataclasses.KW_ONLY
  binarize_input: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def site(self, ctx: Optional[bctx.BinarizationContext]) -> Optional[int]:
    """This layer's site number, None when it is not binary (no context, or not a site)."""
    return None if ctx is None else ctx.config.site_index(self.path)

  def binarized(self, x: jax.Array, kernel: jax.Array, ctx: Optional[bctx.BinarizationContext],
                site: Optional[int]) -> tuple[jax.Array, jax.Array]:
    """Returns (input, kernel) as the layer computes with them, in the compute dtype; `site` is
    `self.site(ctx)`."""
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if site is None:
      return x, kernel.astype(dtype)
    sow_frozen_fraction(self, ctx, site)
    kernel = bctx.binarize_site_kernel(kernel, ctx, site, dtype)
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
    site = self.site(ctx)
    return x if site is None else bctx.binarize_site_tensor(x, ctx, site, 'input')


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
    site = self.site(ctx)
    x, kernel = self.binarized(x, kernel, ctx, site)
    committed_site = None if site is None or self.feature_group_count != 1 else (
        bctx.site_committed(ctx, site))
    padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
    if committed_site is not None:  # StoMPP training: skip what a committed site zeroes.
      y = committed.conv(x, kernel, committed_site, tuple(self.strides), padding,
                         self.binarize_input)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=tuple(self.strides), padding=padding,
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
    x, kernel = self.binarized(x, kernel, ctx, self.site(ctx))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
    return y


# ------------------------------------------------------------------------------- any model by rules

ZOO_LAYERS = (BinaryConv, BinaryDense)  # The layer types the zoo's models binarize.
PLAIN_LAYERS = (nn.Conv, nn.Dense)  # The layer types `ByRules` binarizes.


def site_layers(model: Any) -> tuple[type, ...]:
  """The layer types that can be sites of `model`: plain ones for `ByRules`, else the zoo's."""
  return PLAIN_LAYERS if isinstance(model, ByRules) else ZOO_LAYERS


def _replace_at(tree: Any, path: tuple[str, ...], fn) -> Any:
  """Nested dicts `tree` with fn(leaf) at `path` (KeyError if there is none)."""
  if not path:
    return fn(tree)
  return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], fn)}


def binarize_kernels(params: Any, ctx: bctx.BinarizationContext) -> Any:
  """The params tree with the kernel of every site of `ctx.config.sites` binarized (same tree;
  float32 as the latent kernels: the layer casts it to its compute dtype, as the zoo's layers
  do after binarizing)."""
  for site, path in enumerate(ctx.config.sites):
    params = _replace_at(params, (*path, 'kernel'),
                         lambda kernel, site=site: bctx.binarize_site_tensor(kernel, ctx, site,
                                                                             'kernel'))
  return params


def _binarize_site_input(next_fun, args, kwargs, call, *, ctx: bctx.BinarizationContext,
                         binarize_input: bool):
  """Interceptor: a site's call sows its frozen fraction and gets its input binarized (BNN)."""
  module = call.module
  if call.method_name == '__call__' and isinstance(module, PLAIN_LAYERS):
    site = ctx.config.site_index(module.path)
    if site is not None:
      sow_frozen_fraction(module, ctx, site)
      if binarize_input:
        args = (bctx.binarize_site_tensor(args[0], ctx, site, 'input'), *args[1:])
  return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class ByRules:
  """Any Linen model, its plain `nn.Conv` / `nn.Dense` sites binarized by the context's sites.

  The model is not changed: `init` is the module's own, and `apply` with a context binarizes
  the kernels of the layers listed in `ctx.config.sites` (found by sites.discover_sites from
  the binary rules) and, when `binarize_input` (BNN), their inputs. Called like the zoo's models:

      variables = model.init(key, x, train=False)
      logits, updates = model.apply(variables, x, train=True, ctx=ctx,
                                    mutable=['batch_stats', 'binary_stats'])

  Attributes:
    module: a `flax.linen.Module` called as `module(x, train=...)` returning logits (B, K).
    binarize_input: binarize each site's input too (mode bnn); else kernels only (bwn).
  """

  module: nn.Module
  binarize_input: bool = False

  def init(self, rngs: Any, x: jax.Array, train: bool = False, **kwargs) -> Any:
    return self.module.init(rngs, x, train=train, **kwargs)

  def apply(self, variables: Any, x: jax.Array, *, train: bool = False,
            ctx: Optional[bctx.BinarizationContext] = None, **kwargs) -> Any:
    """x: the module's input (B, ...); `kwargs` (e.g. mutable) go to `module.apply`."""
    if ctx is None or ctx.config.method == 'fp':
      return self.module.apply(variables, x, train=train, **kwargs)
    variables = {**variables, 'params': binarize_kernels(variables['params'], ctx)}
    interceptor = functools.partial(_binarize_site_input, ctx=ctx,
                                    binarize_input=self.binarize_input)
    with nn.intercept_methods(interceptor):
      return self.module.apply(variables, x, train=train, **kwargs)
